"""The LM export: ``<storage>/<run>/model/``, written by the pretrain and instruct stages.

Layouts (``fmri_lm.json`` ``layout``): ``full`` (``full/``: a Hugging Face model + tokenizer),
``base+adapter`` (pretraining with LoRA: ``base/`` + peft ``adapter/``) and ``adapter``
(instruction tuning: ``adapter/`` over another export named in ``base_model``). Beside them:
``fmri_lm.json`` (backbone, fMRI vocabulary, tokenizer artifact, input mode, split record, input
contract, stage settings), ``inputs.safetensors`` (the fMRI input weights of
:class:`~fmrilm.models.fmri_lm.FMRIInputLM`, when it has any), ``probe.pt`` (a probe row and the
trained model's logits on it, so any reload can be checked) and ``README.md`` (its card).
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

from fmrilm import storage
from fmrilm.errors import UserError
from fmrilm.models.fmri_lm import BackboneError, FMRIInputLM

META = "fmri_lm.json"


class ExportMissing(UserError, FileNotFoundError):
    """No LM export where a spec points."""


class ExportDamaged(UserError, ValueError):
    """An export's files cannot be read as the model its ``fmri_lm.json`` describes."""



def location(run_storage: str, run_name: str) -> str:
    """URI of the export an LM stage run ``run_name`` under ``run_storage`` writes."""
    return storage.join(run_storage, run_name, "model")


def run_of(uri: str) -> str:
    """The run name of an export at ``<storage>/<run>/model`` (a folder not named ``model``: its own name)."""
    import posixpath

    path = uri.rstrip("/")
    return posixpath.basename(posixpath.dirname(path) if posixpath.basename(path) == "model" else path)


def write_folder(d: str, target: str, meta: dict, model, probe: dict, logits: torch.Tensor) -> None:
    """Complete the export whose model files lie in the local folder ``d`` (``write`` of the
    stage put them there) and replace ``target`` with it: ``inputs.safetensors`` when ``model``
    is an :class:`FMRIInputLM`, ``probe.pt`` (``probe`` row and its ``logits``), ``fmri_lm.json``
    (``meta``) and the card ``README.md`` (also in ``adapter/``, over peft's empty template)."""
    from safetensors.torch import save_file

    from fmrilm.model_card import lm_card

    if isinstance(model, FMRIInputLM):
        save_file({k: v.detach().cpu().contiguous() for k, v in model.input_state().items()}, os.path.join(d, "inputs.safetensors"))
        meta = meta | model.meta()
    torch.save({"inputs": probe, "logits": logits}, os.path.join(d, "probe.pt"))
    with open(os.path.join(d, META), "w") as f:
        json.dump(meta, f, indent=1)
    card = lm_card(meta, target)
    for folder in (d, os.path.join(d, "adapter")):
        if os.path.isdir(folder):
            with open(os.path.join(folder, "README.md"), "w") as f:
                f.write(card)
    storage.delete_dir(storage.resolve(target))
    storage.copy_tree(d, target)


def local_folder(uri: str) -> str:
    """A local folder holding the export at ``uri``: the folder itself, or this node's cached copy
    of a remote one."""
    from fmrilm.models.fmri_lm import sync_to_local

    return sync_to_local(uri) if storage.is_remote(uri) else storage.resolve(uri).path


def export_meta(uri: str) -> dict:
    """``fmri_lm.json`` of an LM export, or a clear error if ``uri`` is not one."""
    loc = storage.resolve(uri).join(META)
    if not storage.exists(loc):
        raise ExportMissing(f"{uri} is not an fmrilm model export (no fmri_lm.json): run `fmrilm run jobs/pretrain.yaml` first")
    return json.loads(storage.read_text(loc))


def root_export(uri: str) -> str:
    """The pretrained export at the bottom of a chain of adapter exports."""
    while export_meta(uri)["layout"] == "adapter":
        uri = export_meta(uri)["base_model"]
    return uri


def load_model(uri: str):
    """An export loaded for further tuning: LoRA adapters merged into plain weights (the features
    wrapper kept); returns ``(model, tokenizer, meta)``."""
    model, tok, meta = load_exported(uri, merged=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, meta


def load_exported(uri: str, merged: bool = False):
    """A plain transformers (+ peft) model and tokenizer from an export folder (eval mode);
    returns ``(model, tokenizer, meta)``. Layouts: ``full``, ``base+adapter`` (pretraining with
    LoRA) and ``adapter`` (instruction tuning: adapters over another export, named in
    ``base_model``). With continuous fMRI inputs (the features input mode, the scan token) the
    model is wrapped in :class:`FMRIInputLM` with its saved input weights. ``merged=True`` folds every LoRA adapter into plain weights.
    Raises :class:`ExportMissing` or :class:`ExportDamaged` (one line) for a folder that is not an intact export."""
    from safetensors import SafetensorError

    loc = storage.resolve(uri)
    meta = export_meta(uri)
    try:
        return _load_layout(loc, local_folder(uri), meta, merged)
    except UserError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, SafetensorError) as err:  # a file missing, truncated, altered
        raise ExportDamaged(f"{uri} cannot be loaded as the {meta.get('layout')!r} export its {META} describes "
                            f"({type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else 'no detail'}): "
                            "re-run the stage that wrote it, or point at an intact copy") from None


def _load_layout(loc, local: str, meta: dict, merged: bool):
    from peft import PeftModel
    from safetensors.torch import load
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if meta["layout"] == "full":
        model, tok = AutoModelForCausalLM.from_pretrained(os.path.join(local, "full")), AutoTokenizer.from_pretrained(os.path.join(local, "full"))
    elif meta["layout"] == "base+adapter":
        base = AutoModelForCausalLM.from_pretrained(os.path.join(local, "base"))
        model, tok = PeftModel.from_pretrained(base, os.path.join(local, "adapter")), AutoTokenizer.from_pretrained(os.path.join(local, "base"))
    else:
        base, _, _ = load_exported(meta["base_model"], merged=True)
        base = base.lm if isinstance(base, FMRIInputLM) else base
        model, tok = PeftModel.from_pretrained(base, os.path.join(local, "adapter")), AutoTokenizer.from_pretrained(os.path.join(local, "adapter"))
    if merged and isinstance(model, PeftModel):
        model = model.merge_and_unload()
    if meta.get("feature_width") or meta.get("scan_dim"):
        model = FMRIInputLM(model, meta.get("feature_width"), meta.get("max_rois", 512), meta.get("scan_dim"))
        model.load_input_state(load(storage.read_bytes(loc.join("inputs.safetensors"))))
    return model.eval(), tok, meta


def export_tokenizer(uri: str):
    """The tokenizer of an LM export (with a pad token), without loading any weights."""
    from transformers import AutoTokenizer

    meta = export_meta(uri)
    local = local_folder(uri)
    tok = AutoTokenizer.from_pretrained(os.path.join(local, {"full": "full", "base+adapter": "base", "adapter": "adapter"}[meta["layout"]]))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def merge_adapter(uri: str, out: str) -> str:
    """Merge exported LoRA adapters into their base (``base+adapter`` or ``adapter`` layout) and write a ``full``
    export at ``out``; returns ``out``."""
    from fmrilm.model_card import lm_card

    model, tok, meta = load_exported(uri, merged=True)
    if meta["layout"] == "full":
        raise BackboneError(f"{uri} is already a full model (layout 'full'); nothing to merge")
    merged = model.lm if isinstance(model, FMRIInputLM) else model
    with tempfile.TemporaryDirectory(prefix="fmrilm-merge-") as d:
        merged.save_pretrained(os.path.join(d, "full"))
        tok.save_pretrained(os.path.join(d, "full"))
        meta = meta | {"layout": "full", "merged_from": uri}
        with open(os.path.join(d, META), "w") as f:
            json.dump(meta, f, indent=1)
        with open(os.path.join(d, "README.md"), "w") as f:
            f.write(lm_card(meta, out))
        for name in ("probe.pt", "inputs.safetensors"):
            src = storage.resolve(uri).join(name)
            if storage.exists(src):
                with open(os.path.join(d, name), "wb") as f:
                    f.write(storage.read_bytes(src))
        storage.delete_dir(storage.resolve(out))
        storage.copy_tree(d, out)
    return out


def check_tunable(uri: str, lora, seq_len: int) -> dict:
    """Pre-flight of tuning the export at ``uri``: it exists, its backbone has the targets of the
    :class:`~fmrilm.models.lora.LoraSpec` ``lora`` (when enabled) and ``seq_len`` positions;
    returns its ``fmri_lm.json``. Builds the backbone on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fmrilm.models.lora import lora_targets

    meta = export_meta(uri)
    root = root_export(uri)
    cfg = AutoConfig.from_pretrained(os.path.join(local_folder(root), "full" if export_meta(root)["layout"] == "full" else "base"))
    if lora.enabled:
        with torch.device("meta"):
            lora_targets(lora, AutoModelForCausalLM.from_config(cfg))
    limit = getattr(cfg, "max_position_embeddings", getattr(cfg, "n_positions", 10**9))
    if seq_len > limit:
        raise BackboneError(f"seq_len {seq_len} exceeds the backbone's maximum positions ({limit})")
    return meta


def save_tuned(d: str, lm, tok, lora: bool) -> str:
    """Model files of a tuned export into the local folder ``d``: the LoRA adapters (``adapter/``)
    or, with ``lora=False``, every weight (``full/``), each with the tokenizer; returns the layout."""
    sub = "adapter" if lora else "full"
    if lora:
        lm.save_pretrained(os.path.join(d, sub))
    else:
        lm.save_pretrained(os.path.join(d, sub), state_dict={k: v.detach().cpu().clone() for k, v in lm.state_dict().items()})
    tok.save_pretrained(os.path.join(d, sub))
    return sub


TUNED_KEYS = ("backbone", "vocab", "tokenizer", "input_mode", "contract")  # what a tuned export copies from its base's meta
