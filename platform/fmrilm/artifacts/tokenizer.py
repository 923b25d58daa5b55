"""The tokenizer artifact: ``<storage>/<run>/tokenizer/``.

Files: ``config.json`` (model and alignment configs, ``text_dim``, the windowing it was trained
with, ``step``, ``run``, the split record ``split`` and the input ``contract``),
``model.safetensors`` (the tokenizer), ``alignment.safetensors`` (the alignment head, when it has
one), ``codebook_stats.json`` and ``README.md`` (its card). Its tokens table lies beside it, in
``<storage>/<run>/tokens/`` (:func:`tokens_location`).
"""

from __future__ import annotations

import json
import logging

from fmrilm import storage
from fmrilm.data.pipeline import PipelineSpec
from fmrilm.errors import UserError
from fmrilm.models.alignment import AlignmentConfig
from fmrilm.models.tokenizer import FMRITokenizer, TokenizerConfig
from fmrilm.models.tokenizer_objective import TokenizerObjective

log = logging.getLogger("fmrilm.artifacts")
NAME = "tokenizer"


class ArtifactMissing(UserError, FileNotFoundError):
    """No tokenizer artifact where a spec points."""


def location(run_storage: str, run_name: str) -> str:
    """URI of the artifact a tokenizer run ``run_name`` under ``run_storage`` exports."""
    return storage.join(run_storage, run_name, NAME)


def tokens_location(uri: str) -> str:
    """URI of the tokens table ``fmrilm tokenize`` writes for the artifact at ``uri``: the
    ``tokens`` folder beside it."""
    return storage.join(uri.rstrip("/").rsplit("/", 1)[0], "tokens")


def read_config(uri: str) -> dict:
    """``config.json`` of the artifact at ``uri``, or one clear error when there is none."""
    try:
        return json.loads(storage.read_text(storage.resolve(uri).join("config.json")))
    except FileNotFoundError:
        raise ArtifactMissing(f"no tokenizer artifact at {uri} (config.json missing): train one with `fmrilm run jobs/tokenizer.yaml`") from None


def write(uri: str, objective: TokenizerObjective, config: dict, metrics: dict | None = None) -> str:
    """Write ``objective`` (tokenizer + alignment head) with its ``config`` (see the module
    docstring) and its card (final validation ``metrics``) to ``uri``; returns the URI."""
    from safetensors.torch import save

    from fmrilm.model_card import tokenizer_card, write_card

    out = storage.resolve(uri)
    storage.write_bytes(out.join("model.safetensors"), save({k: v.contiguous() for k, v in objective.tokenizer.state_dict().items()}))
    if objective.align is not None:
        storage.write_bytes(out.join("alignment.safetensors"), save({k: v.contiguous() for k, v in objective.align.state_dict().items()}))
    storage.write_text(out.join("config.json"), json.dumps(config, indent=1))
    stats = objective.tokenizer.quantizer.stats()
    storage.write_text(out.join("codebook_stats.json"), json.dumps({**stats, "usage": objective.tokenizer.quantizer.usage.tolist()}))
    write_card(out.uri, tokenizer_card(config, stats, out.uri, metrics))
    return out.uri


class ArtifactDamaged(UserError, ValueError):
    """A tokenizer artifact's files cannot be read as the model its ``config.json`` describes."""


def _weights(uri: str, name: str) -> dict:
    """The tensors of ``<uri>/<name>``; :class:`ArtifactDamaged` when missing, truncated or altered."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(storage.read_bytes(storage.resolve(uri).join(name)))
    except (FileNotFoundError, SafetensorError, OSError, ValueError) as err:
        raise ArtifactDamaged(f"tokenizer artifact {uri}: {name} cannot be read ({type(err).__name__}: {str(err)[:200]}): "
                              "train it again (same run name) or point at an intact copy") from None


def _load_state(module, state: dict, uri: str, name: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as err:  # shapes or keys that do not match config.json
        raise ArtifactDamaged(f"tokenizer artifact {uri}: {name} does not match its config.json ({str(err).splitlines()[0][:200]}): "
                              "train it again (same run name) or point at an intact copy") from None


def load_tokenizer(uri: str) -> tuple[FMRITokenizer, dict]:
    """The trained tokenizer at ``uri`` (eval mode) and its config."""
    cfg = read_config(uri)
    model = FMRITokenizer(TokenizerConfig(**cfg["model"]))
    _load_state(model, _weights(uri, "model.safetensors"), uri, "model.safetensors")
    return model.eval(), cfg


def codebook(uri: str):
    """The artifact's codebook ``[num_codes, code_dim]`` (a tensor), without building the model."""
    return _weights(uri, "model.safetensors")["quantizer.codebook"]


def load_objective(uri: str) -> tuple[TokenizerObjective, dict]:
    """The artifact's tokenizer with its alignment head (when it has one; ``objective.align`` is
    None otherwise), eval mode, and its config."""
    cfg = read_config(uri)
    loc = storage.resolve(uri)
    has_head = storage.exists(loc.join("alignment.safetensors"))
    align = AlignmentConfig(**cfg["alignment"]) if has_head else AlignmentConfig(domain_weight=0, contrastive_weight=0)
    objective = TokenizerObjective(TokenizerConfig(**cfg["model"]), align, cfg["text_dim"])
    _load_state(objective.tokenizer, _weights(uri, "model.safetensors"), uri, "model.safetensors")
    if has_head:
        _load_state(objective.align, _weights(uri, "alignment.safetensors"), uri, "alignment.safetensors")
    return objective.eval(), cfg


def windows_like(data: PipelineSpec, cfg: dict) -> PipelineSpec:
    """``data`` windowed, normalised and resampled the way the artifact of ``cfg`` was trained,
    split by the policy it was trained with unless ``data`` names one."""
    from fmrilm.data.splits import inherited

    return data.model_copy(update={**{k: cfg["data"][k] for k in ("window", "stride", "normalise", "target_tr")},
                                   "split": inherited(data.split, cfg.get("split"))})


def check_inputs(data: PipelineSpec, cfg: dict, uri: str) -> list[str]:
    """Every dataset ``data`` selects checked against the input contract of the artifact at
    ``uri`` (config ``cfg``; :mod:`fmrilm.data.contract`: atlas, ROI labels and TR raise; then a
    sample of each dataset's windows is compared with the training signal). Returns the warnings
    (also logged): what a mapping let through, distribution shifts. Artifacts older than
    contracts are read with a warning."""
    from fmrilm.data.contract import check_datasets, shift_warnings
    from fmrilm.data.pipeline import sample_windows, selected_datasets

    contract = cfg.get("contract")
    if contract is None:
        warnings = [f"tokenizer {uri} records no input contract (trained before contracts were written): atlas and TR unchecked"]
    else:
        found = selected_datasets(data)
        warnings = check_datasets(contract, [m for _, m in found], f"tokenizer {uri}", data.atlas_mapping, data.target_tr)
        if contract.get("signal"):
            for _, m in found:
                sample = sample_windows(data.model_copy(update={"datasets": [m["dataset"]]}), None)
                warnings += shift_warnings(contract, sample, m["dataset"], f"tokenizer {uri}")
    for w in warnings:
        log.warning(w)
    return warnings
