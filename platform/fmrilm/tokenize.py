"""``fmrilm tokenize SPEC``: scans -> ``tokens`` table (code ids per window) with a trained tokenizer.

A Ray Data map over the window stream, with the tokenizer loaded once per worker (an actor
pool). Rows: ``scan_id``, ``subject_id``, ``start`` (window start, timepoints), ``n_rois``,
``n_patches``, ``codes`` (``list<int32>``, ROI-major: ``reshape(n_rois, n_patches)``) and, with
``features: true`` (the default), ``features`` (``list<float32>``, ``reshape(n_rois, n_patches, width)``:
the encoder features the LM's scan token summarises and its ``features`` input mode projects). Token ids are deterministic for a
given artifact and input (eval mode, nearest code, no updates).
"""

from __future__ import annotations

import json
import logging
from typing import Literal

import numpy as np
from pydantic import Field

from fmrilm import runtime, storage
from fmrilm.config import Strict
from fmrilm.data.pipeline import PipelineSpec, build_windows

log = logging.getLogger("fmrilm.tokenize")


class TokenizeSpec(Strict):
    """Spec of ``jobs/tokenize.yaml``. ``data.window``/``stride`` default to the artifact's."""

    kind: Literal["tokenize"] = "tokenize"
    tokenizer: str = Field("./fmrilm-data/runs/tokenizer/tokenizer", description="tokenizer artifact folder URI")
    data: PipelineSpec = PipelineSpec()
    out: str | None = Field(None, description="tokens table folder (default: <artifact>/../tokens)")
    batch_size: int = Field(64, ge=1)
    workers: int = Field(1, ge=1, description="tokenizer replicas (actors)")
    features: bool = Field(True, description="also store encoder features (the LM's scan token and features input mode need them)")
    use_window_from_artifact: bool = True
    probes: bool = Field(True, description="linear probes of sex and age on the held-out scans' codes and scan vectors, "
                         "written into the table's manifest.json")


class TokenizeBatch:
    """Ray Data callable class: loads the tokenizer once, maps window batches to code ids."""

    def __init__(self, artifact: str, features: bool = False):
        import torch

        from fmrilm.train.tokenizer import load_artifact

        torch.set_num_threads(1)
        self.model, self.cfg = load_artifact(artifact)
        self.features = features

    def __call__(self, batch: dict):
        import pyarrow as pa
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch["x"], dtype=np.float32))
        codes, feats = self.model.tokenize_with_features(x)
        codes = codes.numpy().astype(np.int32)  # [b, rois, patches]
        b, r, n = codes.shape
        flat = pa.ListArray.from_arrays(pa.array(np.arange(b + 1, dtype=np.int32) * (r * n)), pa.array(codes.ravel()))
        extra = {}
        if self.features:
            w = feats.shape[-1]
            extra["features"] = pa.ListArray.from_arrays(pa.array(np.arange(b + 1, dtype=np.int32) * (r * n * w)),
                                                         pa.array(feats.numpy().astype(np.float32).ravel()))
        return pa.table({
            "scan_id": pa.array(batch["scan_id"].tolist(), pa.string()),
            "subject_id": pa.array(batch["subject_id"].tolist(), pa.string()),
            "start": pa.array(batch["start"], pa.int64()), "n_rois": pa.array(np.full(b, r, np.int32)),
            "n_patches": pa.array(np.full(b, n, np.int32)), "codes": flat, **extra,
        })


def artifact_config(uri: str) -> dict:
    """``config.json`` of a tokenizer artifact, or a clear error when there is none."""
    try:
        return json.loads(storage.read_text(storage.resolve(uri).join("config.json")))
    except FileNotFoundError:
        raise FileNotFoundError(f"no tokenizer artifact at {uri} (config.json missing): train one with `fmrilm run jobs/tokenizer.yaml`") from None


def with_artifact_windows(data: PipelineSpec, cfg: dict) -> PipelineSpec:
    """``data`` windowed, normalised and resampled the way the artifact was trained, split by the
    policy it was trained with unless ``data`` names one."""
    from fmrilm.data.splits import inherited

    return data.model_copy(update={**{k: cfg["data"][k] for k in ("window", "stride", "normalise", "target_tr")},
                                   "split": inherited(data.split, cfg.get("split"))})


def check_contract(data: PipelineSpec, cfg: dict, uri: str) -> list[str]:
    """Every dataset ``data`` selects checked against the input contract of the artifact at
    ``uri`` (:mod:`fmrilm.data.contract`: atlas, ROI labels and TR raise; then a sample of each
    dataset's windows is compared with the training signal). Returns the
    warnings (also logged): what a mapping let through, distribution shifts. Artifacts older
    than contracts are read with a warning."""
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


def run(spec: TokenizeSpec) -> dict:
    """Tokenize every window of the selected datasets; returns the table URI and counts."""
    from ray.data import ActorPoolStrategy

    artifact = storage.resolve(spec.tokenizer)
    cfg = artifact_config(spec.tokenizer)
    data = with_artifact_windows(spec.data, cfg) if spec.use_window_from_artifact else spec.data
    runtime.init_ray()
    warnings = check_contract(data, cfg, artifact.uri)
    ds, n = build_windows(data, None)
    out = storage.resolve(spec.out or storage.join(spec.tokenizer.rstrip("/").rsplit("/", 1)[0], "tokens"))
    storage.delete_dir(out)  # a re-run replaces the table
    ds = ds.select_columns(["x", "scan_id", "subject_id", "start"]).map_batches(
        TokenizeBatch, fn_constructor_kwargs={"artifact": artifact.uri, "features": spec.features}, batch_size=spec.batch_size,
        compute=ActorPoolStrategy(size=spec.workers), num_cpus=1, batch_format="numpy",
        runtime_env={"env_vars": runtime.forwarded_env()})  # the actors read the artifact from this process's storage
    ds.write_parquet(out.path, filesystem=out.fs)
    summary = {"tokens": out.uri, "windows": n, "artifact": artifact.uri, "window": data.window, "stride": data.stride,
               "num_codes": cfg["model"]["num_codes"], "features": spec.features, "width": cfg["model"]["width"], "input_warnings": warnings}
    if spec.probes:
        summary["probes"] = held_out_probes(out.uri, data, cfg["data"]["window"])
    storage.write_text(out.join("manifest.json"), json.dumps(summary, indent=1))
    log.info("tokenized %d windows -> %s", n, out.uri)
    return summary


def held_out_probes(tokens_uri: str, data: PipelineSpec, window: int, splits: tuple[str, ...] = ("val", "test")) -> list[dict]:
    """Cross-validated linear probes (:mod:`fmrilm.eval.probes`) of sex and age on the held-out
    scans' codes (ROI pairs sharing a code) and, when stored, scan vectors (the encoder
    features' connectivity): what the tokenizer's outputs keep, before any LM sees them.
    ``[{"task", "representation", "n", "metrics"}]``; empty when too few held-out scans."""
    from fmrilm.data.pipeline import scan_index
    from fmrilm.eval.probes import code_agreement, cv_probe
    from fmrilm.models.scan_token import scan_vector
    from fmrilm.train.lm import scan_codes

    index = scan_index(data)
    held = index[index["split"].isin(splits)]
    tokens = read_tokens(tokens_uri)
    codes, feats = scan_codes(tokens[tokens["scan_id"].isin(held["scan_id"])], window)
    rows = []
    for task, column in (("sex", "sex"), ("age", "age")):
        part = held[held["scan_id"].isin(codes) & held[column].notna()]
        if task == "sex":
            part = part[part["sex"].isin(["M", "F"])]
        ids = list(part["scan_id"])
        if len(ids) < 10 or len({codes[s].shape[0] for s in ids}) > 1:
            continue
        y = part[column].to_numpy(float if task == "age" else object)
        reps = {"codes (ROI pairs sharing a code)": np.stack([code_agreement(codes[s]) for s in ids])}
        if feats:
            reps["scan vector (encoder features)"] = np.stack([scan_vector(feats[s]) for s in ids])
        for name, x in reps.items():
            rows.append({"task": task, "representation": name, "n": len(ids), "metrics": cv_probe(x, y, task == "age")})
    for r in rows:
        log.info("probe on %d held-out scans: %s from %s: %s", r["n"], r["task"], r["representation"],
                 ", ".join(f"{k} {v:.3f}" for k, v in r["metrics"].items()))
    return rows


def read_tokens(uri: str):
    """The tokens table as pandas, sorted by (scan_id, start)."""
    import pyarrow.dataset as pads

    loc = storage.resolve(uri)
    t = pads.dataset(loc.path, filesystem=loc.fs, format="parquet", exclude_invalid_files=True).to_table()
    return t.to_pandas().sort_values(["scan_id", "start"]).reset_index(drop=True)


def tokens_for(tokenizer_uri: str, tokens_uri: str | None = None, need_features: bool = False):
    """``(tokens table, its URI)`` of a tokenizer artifact: ``tokens_uri`` or the ``tokens`` folder
    beside the artifact (where ``fmrilm tokenize`` writes it); clear errors when it is missing or
    lacks the encoder features the scan token and the features input mode need."""
    uri = tokens_uri or storage.join(tokenizer_uri.rstrip("/").rsplit("/", 1)[0], "tokens")
    try:
        tokens = read_tokens(uri)
    except (FileNotFoundError, OSError) as err:
        raise FileNotFoundError(f"no tokens table at {uri}: run `fmrilm tokenize jobs/tokenize.yaml` first ({err})") from None
    if need_features and "features" not in tokens.columns:
        raise ValueError(f"the scan token and the features input mode need encoder features in the tokens table {uri}: "
                         "re-run `fmrilm tokenize jobs/tokenize.yaml features=true`")
    return tokens, uri


def evaluate(uri: str, data: PipelineSpec, split: str | None = None, batch_size: int = 64) -> dict:
    """Held-out metrics of a tokenizer artifact on the windows of ``split`` (None: every scan):
    reconstruction R^2 (mean over windows x ROIs) and MSE, code perplexity and used fraction, FC
    preservation (whole-scan FC of the decoded signal vs the input's, stitched windows), and, when
    the artifact has its alignment head, the domain classifier's accuracy (fMRI vs text tokens;
    0.5 means the two are indistinguishable)."""
    import torch

    from fmrilm.data.pipeline import scan_index
    from fmrilm.data.splits import check_unseen, subject_keys
    from fmrilm.train.tokenizer import text_inputs, validate

    cfg = artifact_config(uri)
    data = with_artifact_windows(data, cfg)
    runtime.init_ray()
    warnings = check_contract(data, cfg, uri)
    if split not in (None, "train"):
        check_unseen(subject_keys(scan_index(data), (split,)), cfg.get("split"), f"scored as held-out split {split!r}", uri)
    objective, stage = load_objective(uri, data)
    has_head = objective.align is not None
    text_tokens = text_inputs(stage)[0] if has_head else None
    ds, n = build_windows(data, split)
    if n == 0:
        raise ValueError(f"no windows to evaluate in split {split!r} of {data.data} (datasets {data.datasets or 'all'})")
    metrics = validate(objective, ds, batch_size, torch.from_numpy(text_tokens) if text_tokens is not None else None)
    return {k.removeprefix("val/"): v for k, v in metrics.items()} | {"windows": n, "split": split, "num_codes": stage.model.num_codes,
                                                                      "input_warnings": warnings}


def load_objective(uri: str, data: PipelineSpec | None = None):
    """The artifact's tokenizer with its alignment head (when it has one), eval mode, and the stage
    spec it implies: ``(TokenizerObjective, TokenizerStageSpec)``."""
    from safetensors.torch import load

    from fmrilm.models.alignment import AlignmentConfig
    from fmrilm.models.tokenizer import TokenizerConfig
    from fmrilm.train.tokenizer import TokenizerObjective, TokenizerStageSpec

    cfg = artifact_config(uri)
    loc = storage.resolve(uri)
    has_head = storage.exists(loc.join("alignment.safetensors"))
    align = AlignmentConfig(**cfg["alignment"]) if has_head else AlignmentConfig(domain_weight=0, contrastive_weight=0)
    stage = TokenizerStageSpec(data=data or with_artifact_windows(PipelineSpec(), cfg), model=TokenizerConfig(**cfg["model"]), alignment=align)
    objective = TokenizerObjective(stage.model, align, cfg["text_dim"])
    objective.tokenizer.load_state_dict(load(storage.read_bytes(loc.join("model.safetensors"))))
    if has_head:
        objective.align.load_state_dict(load(storage.read_bytes(loc.join("alignment.safetensors"))))
    return objective.eval(), stage


def codebook_pairs(uri: str, data: PipelineSpec, max_windows: int = 256):
    """Paired examples for mapping the codebook into the text space the tokenizer was aligned to:
    ``(code vectors [n, code_dim], projected encoder features [n, text_dim])`` over up to
    ``max_windows`` training windows, each encoder token paired with its nearest code. ``None``
    when the artifact has no alignment head."""
    import torch
    import torch.nn.functional as F

    data = with_artifact_windows(data, artifact_config(uri))
    objective, _ = load_objective(uri, data)
    if objective.align is None:
        return None
    runtime.init_ray()
    ds, n = build_windows(data, "train")
    if n == 0:
        return None
    tok = objective.tokenizer
    xs, ys = [], []
    with torch.no_grad():
        for batch in ds.limit(max_windows).iter_batches(batch_size=64, batch_format="numpy"):
            x = torch.from_numpy(np.require(batch["x"], np.float32, ["C", "W"]))
            feats = tok.encode(x).reshape(-1, tok.cfg.width)
            codes = tok.quantizer.nearest(F.normalize(tok.to_code(feats), dim=-1))
            xs.append(tok.quantizer.codebook[codes])
            ys.append(objective.align.project(feats))
    return torch.cat(xs), torch.cat(ys)
