"""``fmrilm tokenize SPEC``: scans -> ``tokens`` table (code ids per window) with a trained tokenizer
(every later stage reads it with :mod:`fmrilm.artifacts.tokens`).

A Ray Data map over the window stream, with the tokenizer loaded once per worker (an actor
pool). Rows: ``scan_id``, ``subject_id``, ``start`` (window start, timepoints), ``n_rois``,
``n_channels`` (code channels per patch: ``n_rois`` in the tokenizer's ``roi`` layout, 1 in its
``state`` layout), ``n_patches``, ``codes`` (``list<int32>``, channel-major:
``reshape(n_channels, n_patches)``) and, with ``features: true`` (the default), ``features``
(``list<float32>``, ``reshape(n_channels, n_patches, width)``:
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
from fmrilm.artifacts import tokenizer as artifact
from fmrilm.config import StageSpec
from fmrilm.artifacts.tokens import CodeDecoder, fc_encoder, read_tokens, scan_codes, scan_rois, token_hop
from fmrilm.data.pipeline import PipelineSpec, build_windows

log = logging.getLogger("fmrilm.tokens")


class TokenizeSpec(StageSpec):
    """Spec of ``jobs/tokenize.yaml``. ``data.window``/``stride`` default to the artifact's."""

    kind: Literal["tokenize"] = "tokenize"
    tokenizer: str = Field("./fmrilm-data/runs/tokenizer/tokenizer", description="tokenizer artifact folder URI")
    data: PipelineSpec = PipelineSpec()
    out: str | None = Field(None, description="tokens table folder (default: <artifact>/../tokens)")
    batch_size: int = Field(64, ge=1)
    workers: int = Field(1, ge=1, description="tokenizer replicas (actors)")
    features: bool = Field(True, description="also store encoder features (the LM's scan token and features input mode need them; "
                           "a tokenizer with model.encoder=fc has none: its input is the window's FC)")
    use_window_from_artifact: bool = True
    probes: bool = Field(True, description="linear probes of sex and age on the held-out scans' codes and scan vectors, "
                         "written into the table's manifest.json")


class TokenizeBatch:
    """Ray Data callable class: loads the tokenizer once, maps window batches to code ids."""

    def __init__(self, artifact_uri: str, features: bool = False):
        import torch

        torch.set_num_threads(1)
        self.model, self.cfg = artifact.load_tokenizer(artifact_uri)
        self.features = features

    def __call__(self, batch: dict):
        import pyarrow as pa
        import torch

        x = torch.from_numpy(np.array(batch["x"], dtype=np.float32))  # a writable copy (Ray Data hands a read-only view)
        codes, feats = self.model.tokenize_with_features(x)
        codes = codes.numpy().astype(np.int32)  # [b, channels, patches]
        b, c, n = codes.shape
        flat = pa.ListArray.from_arrays(pa.array(np.arange(b + 1, dtype=np.int32) * (c * n)), pa.array(codes.ravel()))
        extra = {}
        if self.features:
            w = feats.shape[-1]
            extra["features"] = pa.ListArray.from_arrays(pa.array(np.arange(b + 1, dtype=np.int32) * (c * n * w)),
                                                         pa.array(feats.numpy().astype(np.float32).ravel()))
        return pa.table({
            "scan_id": pa.array(batch["scan_id"].tolist(), pa.string()),
            "subject_id": pa.array(batch["subject_id"].tolist(), pa.string()),
            "start": pa.array(batch["start"], pa.int64()), "n_rois": pa.array(np.full(b, x.shape[1], np.int32)),
            "n_channels": pa.array(np.full(b, c, np.int32)), "n_patches": pa.array(np.full(b, n, np.int32)), "codes": flat, **extra,
        })


def check(spec: TokenizeSpec) -> tuple[dict, PipelineSpec]:
    """Checks before tokenizing: the tokenizer artifact exists and the datasets named exist (the
    input contract is checked once Ray is up, as it samples windows); returns ``(artifact config,
    the windowing actually used)``."""
    from fmrilm.data.pipeline import selected_datasets

    cfg = artifact.read_config(spec.tokenizer)
    data = artifact.windows_like(spec.data, cfg) if spec.use_window_from_artifact else spec.data
    selected_datasets(data)
    return cfg, data


def run(spec: TokenizeSpec) -> dict:
    """Tokenize every window of the selected datasets; returns the table URI and counts."""
    from ray.data import ActorPoolStrategy

    loc = storage.resolve(spec.tokenizer)
    cfg, data = check(spec)
    runtime.init_ray()
    warnings = artifact.check_inputs(data, cfg, loc.uri)
    ds, n = build_windows(data, None)
    features = spec.features and not fc_encoder(cfg)  # an fc tokenizer's features would be the window FC itself
    out = storage.resolve(spec.out or artifact.tokens_location(spec.tokenizer))
    storage.delete_dir(out)  # a re-run replaces the table
    ds = ds.select_columns(["x", "scan_id", "subject_id", "start"]).map_batches(
        TokenizeBatch, fn_constructor_kwargs={"artifact_uri": loc.uri, "features": features}, batch_size=spec.batch_size,
        compute=ActorPoolStrategy(size=spec.workers), num_cpus=1, batch_format="numpy",
        runtime_env={"env_vars": runtime.forwarded_env()})  # the actors read the artifact from this process's storage
    ds.write_parquet(out.path, filesystem=out.fs)
    summary = {"tokens": out.uri, "windows": n, "artifact": loc.uri, "window": data.window, "stride": data.stride,
               "num_codes": cfg["model"]["num_codes"], "features": features, "width": cfg["model"]["width"], "input_warnings": warnings}
    if spec.probes:
        summary["probes"] = held_out_probes(out.uri, data, loc.uri, cfg)
    storage.write_text(out.join("manifest.json"), json.dumps(summary, indent=1))
    log.info("tokenized %d windows -> %s", n, out.uri)
    return summary


def held_out_probes(tokens_uri: str, data: PipelineSpec, tokenizer_uri: str, cfg: dict, splits: tuple[str, ...] = ("val", "test")) -> list[dict]:
    """Cross-validated linear probes (:mod:`fmrilm.eval.probes`) of sex and age on the held-out
    scans' tokenizer outputs (:func:`~fmrilm.eval.probes.tokenizer_representations`; ``cfg``: the artifact's config):
    what they keep, before any LM sees them. ``[{"task", "representation", "n", "metrics"}]``;
    empty when too few held-out scans."""
    from fmrilm.data.pipeline import scan_index
    from fmrilm.eval.probes import cv_probe, tokenizer_representations

    index = scan_index(data)
    held = index[index["split"].isin(splits)]
    tokens = read_tokens(tokens_uri)
    tokens = tokens[tokens["scan_id"].isin(held["scan_id"])]
    codes, feats = scan_codes(tokens, token_hop(cfg))
    decoder = CodeDecoder(tokenizer_uri, cfg, scan_rois(tokens))
    rows = []
    for task, column in (("sex", "sex"), ("age", "age")):
        part = held[held["scan_id"].isin(codes) & held[column].notna()]
        if task == "sex":
            part = part[part["sex"].isin(["M", "F"])]
        ids = list(part["scan_id"])
        if len(ids) < 10:
            continue
        y = part[column].to_numpy(float if task == "age" else object)
        for name, fn in tokenizer_representations(ids, codes, feats, decoder).items():
            rows.append({"task": task, "representation": name, "n": len(ids), "metrics": cv_probe(fn(), y, task == "age")})
    for r in rows:
        log.info("probe on %d held-out scans: %s from %s: %s", r["n"], r["task"], r["representation"],
                 ", ".join(f"{k} {v:.3f}" for k, v in r["metrics"].items()))
    return rows


def summary(result: dict) -> list[str]:
    """Lines a person reads after :func:`run`; the first is the headline (windows, the codes' sex probe)."""
    probes = [f"{r['representation'].split(' (')[0]} {r['metrics']['balanced_accuracy']:.2f}" for r in result.get("probes", [])
              if r["task"] == "sex" and "balanced_accuracy" in r["metrics"]]
    n = next((r["n"] for r in result.get("probes", [])), 0)
    head = f"{result['windows']} windows tokenized" + (f"; sex probe on {n} held-out scans: {', '.join(probes)}" if probes else "")
    return [head, f"tokens table: {result['tokens']}", *(f"warning: {w}" for w in result.get("input_warnings", []))]
