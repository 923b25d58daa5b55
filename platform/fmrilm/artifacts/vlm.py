"""The VLM baseline's export: ``<storage>/<run>/model/``, written by :mod:`fmrilm.train.vlm`.

Layouts (``fmri_vlm.json`` ``layout``): ``adapter`` (peft ``adapter/`` over the VLM named in
``source``; a built-in tiny VLM's random base weights are saved beside it as ``base/``) and
``full`` (``full/``: every weight tuned). Beside them: ``processor/`` (the processor the rows were
encoded with), ``probe.safetensors`` (a training row and the tuned model's logits on it: every reload is
checked against them) and ``fmri_vlm.json`` (family, how scans were rendered and the colour scale
fitted on the training scans, tasks, the labels' classes, the split record).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from fmrilm import storage
from fmrilm.artifacts.lm import ExportDamaged, ExportMissing, local_folder

META = "fmri_vlm.json"
PROBE = "probe.safetensors"
PROBE_TOLERANCE = 1e-3  # largest absolute logit difference a reload may show on the probe row


def write(d: str, target: str, meta: dict, probe: dict[str, np.ndarray], logits: torch.Tensor) -> None:
    """Complete the export whose model and processor files lie in the local folder ``d`` with the
    probe and ``fmri_vlm.json``, and replace ``target`` with it."""
    from safetensors.torch import save_file

    tensors = {f"inputs.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in probe.items()}
    save_file(tensors | {"logits": logits.contiguous()}, os.path.join(d, PROBE))
    with open(os.path.join(d, META), "w") as f:
        json.dump(meta, f, indent=1)
    storage.delete_dir(storage.resolve(target))
    storage.copy_tree(d, target)


def export_meta(uri: str) -> dict:
    """``fmri_vlm.json`` of a VLM export, or a clear error if ``uri`` is not one."""
    loc = storage.resolve(uri).join(META)
    if not storage.exists(loc):
        raise ExportMissing(f"{uri} is not an fmrilm VLM export (no {META}): run `fmrilm run jobs/baseline_vlm.yaml` first")
    return json.loads(storage.read_text(loc))


def load(uri: str, check: bool = True):
    """The tuned VLM (adapters merged, eval mode), its processor and metadata: ``(model, processor,
    meta)``; with ``check`` its logits on the probe row must match the trained model's. Raises
    :class:`ExportMissing` or :class:`ExportDamaged` (one line)."""
    from safetensors import SafetensorError

    meta = export_meta(uri)
    local = local_folder(uri)
    try:
        model, processor = _load_layout(local, meta)
        if check:
            check_probe(model, local, uri)
    except (ExportMissing, ExportDamaged):
        raise
    except (OSError, RuntimeError, ValueError, KeyError, SafetensorError) as err:
        raise ExportDamaged(f"{uri} cannot be loaded as the {meta.get('layout')!r} VLM export its {META} describes "
                            f"({type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else 'no detail'}): "
                            "re-run the stage that wrote it, or point at an intact copy") from None
    return model, processor, meta


def _load_layout(local: str, meta: dict):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from fmrilm.models.vlm import load_vlm

    processor = AutoProcessor.from_pretrained(os.path.join(local, "processor"))
    if meta["layout"] == "full":
        model = AutoModelForImageTextToText.from_pretrained(os.path.join(local, "full"))
    else:
        base_dir = os.path.join(local, "base")
        if os.path.isdir(base_dir):
            base = AutoModelForImageTextToText.from_pretrained(base_dir)
        else:
            base, _, _ = load_vlm(meta["source"], cache_dir=meta.get("cache_dir"))
        model = PeftModel.from_pretrained(base, os.path.join(local, "adapter")).merge_and_unload()
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return model.eval(), processor


@torch.no_grad()
def probe_logits(model, inputs: dict[str, np.ndarray], family) -> torch.Tensor:
    """Logits ``[1, L, vocab]`` (float32, CPU) of ``model`` on one encoded row."""
    from fmrilm.models.vlm import model_inputs

    batch = {k: torch.from_numpy(np.array(v))[None].to(model.device) for k, v in inputs.items()}
    return model(**model_inputs(batch, family), use_cache=False).logits.float().cpu()


def check_probe(model, local: str, uri: str) -> None:
    """Raise :class:`ExportDamaged` when the reloaded ``model``'s logits on the probe row differ
    from those the trained model gave."""
    from fmrilm.models.vlm import family_of

    from safetensors.torch import load_file

    probe = load_file(os.path.join(local, PROBE))
    inputs = {k.removeprefix("inputs."): v.numpy() for k, v in probe.items() if k.startswith("inputs.")}
    got = probe_logits(model, inputs, family_of(model))
    diff = float((got - probe["logits"]).abs().max())
    if diff > PROBE_TOLERANCE:
        raise ExportDamaged(f"{uri}: the reloaded VLM's logits differ from the trained model's by {diff:.2g} on the probe row "
                            f"(tolerance {PROBE_TOLERANCE}): its files do not hold the trained weights")
