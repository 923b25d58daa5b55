"""``fmrilm tokenize SPEC``: scans -> ``tokens`` table (code ids per window) with a trained tokenizer,
and the readers of that table.

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
from fmrilm.config import Strict
from fmrilm.data.pipeline import PipelineSpec, build_windows
from fmrilm.errors import UserError

log = logging.getLogger("fmrilm.tokens")


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
    out = storage.resolve(spec.out or artifact.tokens_location(spec.tokenizer))
    storage.delete_dir(out)  # a re-run replaces the table
    ds = ds.select_columns(["x", "scan_id", "subject_id", "start"]).map_batches(
        TokenizeBatch, fn_constructor_kwargs={"artifact_uri": loc.uri, "features": spec.features}, batch_size=spec.batch_size,
        compute=ActorPoolStrategy(size=spec.workers), num_cpus=1, batch_format="numpy",
        runtime_env={"env_vars": runtime.forwarded_env()})  # the actors read the artifact from this process's storage
    ds.write_parquet(out.path, filesystem=out.fs)
    summary = {"tokens": out.uri, "windows": n, "artifact": loc.uri, "window": data.window, "stride": data.stride,
               "num_codes": cfg["model"]["num_codes"], "features": spec.features, "width": cfg["model"]["width"], "input_warnings": warnings}
    if spec.probes:
        summary["probes"] = held_out_probes(out.uri, data, loc.uri, cfg)
    storage.write_text(out.join("manifest.json"), json.dumps(summary, indent=1))
    log.info("tokenized %d windows -> %s", n, out.uri)
    return summary


def held_out_probes(tokens_uri: str, data: PipelineSpec, tokenizer_uri: str, cfg: dict, splits: tuple[str, ...] = ("val", "test")) -> list[dict]:
    """Cross-validated linear probes (:mod:`fmrilm.eval.probes`) of sex and age on the held-out
    scans' tokenizer outputs (:func:`tokenizer_representations`; ``cfg``: the artifact's config):
    what they keep, before any LM sees them. ``[{"task", "representation", "n", "metrics"}]``;
    empty when too few held-out scans."""
    from fmrilm.data.pipeline import scan_index
    from fmrilm.eval.probes import cv_probe

    index = scan_index(data)
    held = index[index["split"].isin(splits)]
    tokens = read_tokens(tokens_uri)
    tokens = tokens[tokens["scan_id"].isin(held["scan_id"])]
    codes, feats = scan_codes(tokens, cfg["data"]["window"])
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


def tokenizer_representations(ids: list[str], codes: dict[str, np.ndarray], feats: dict[str, np.ndarray], decoder: "CodeDecoder",
                              vectors: dict[str, np.ndarray] | None = None) -> dict:
    """What a linear probe reads of the tokenizer's outputs for scans ``ids``, name -> a function
    giving ``[scans, dim]``: how often each code occurs (a bag of tokens), the FC of the signal
    the tokenizer's decoder rebuilds from the codes alone (the coupling the codes keep; in the
    roi layout carried by which codes co-occur), and, with per-ROI encoder features, the scan
    vector (``vectors`` where already computed). A representation whose shape differs between
    scans (several atlases) is left out."""
    from fmrilm.eval.probes import code_histogram
    from fmrilm.features.dynamics import fc
    from fmrilm.models.scan_token import scan_vector

    reps = {}
    if len({codes[s].shape for s in ids}) == 1:
        reps["codes: histogram"] = lambda: np.stack([code_histogram(codes[s], decoder.num_codes) for s in ids])
        reps["codes: decoded FC"] = lambda: np.stack([fc(decoder(s, codes[s])) for s in ids])
    if feats and len({feats[s].shape[0] for s in ids}) == 1 and feats[ids[0]].shape[0] > 1:  # per-ROI features (roi layout)
        vectors = vectors or {}
        reps["scan vector (encoder features)"] = lambda: np.stack([vectors[s] if s in vectors else scan_vector(feats[s]) for s in ids])
    return reps


class CodeDecoder:
    """``decoder(scan_id, codes [channels, steps])`` -> the signal ``[rois, steps * patch]`` the
    tokenizer artifact's decoder (``cfg``: its config) rebuilds from the codes alone (the model is
    loaded on first use)."""

    def __init__(self, tokenizer_uri: str, cfg: dict, rois: dict[str, int]):
        self.uri, self.rois = tokenizer_uri, rois
        self.num_codes = cfg["model"]["num_codes"]
        self.per_window = cfg["data"]["window"] // cfg["model"]["patch"]
        self.model = None

    def __call__(self, scan_id: str, codes: np.ndarray) -> np.ndarray:
        import torch

        if self.model is None:
            self.model = artifact.load_tokenizer(self.uri)[0]
        c, steps = codes.shape
        n = self.per_window
        windows = torch.from_numpy(np.asarray(codes[:, : steps // n * n], np.int64).reshape(c, -1, n).transpose(1, 0, 2).copy())
        signal = self.model.decode(windows, self.rois[scan_id])  # [windows, rois, time]
        return signal.permute(1, 0, 2).reshape(signal.shape[1], -1).numpy()


def scan_rois(tokens) -> dict[str, int]:
    """``scan_id -> ROIs`` of a tokens table (pandas)."""
    return tokens.groupby("scan_id")["n_rois"].first().astype(int).to_dict()


def read_tokens(uri: str):
    """The tokens table as pandas, sorted by (scan_id, start)."""
    import pyarrow.dataset as pads

    loc = storage.resolve(uri)
    t = pads.dataset(loc.path, filesystem=loc.fs, format="parquet", exclude_invalid_files=True).to_table()
    return t.to_pandas().sort_values(["scan_id", "start"]).reset_index(drop=True)


class TokensMissing(UserError, FileNotFoundError):
    """No tokens table where a stage looks for one."""


class ScanNotTokenized(UserError, KeyError):
    """A scan a stage asks about has no rows in the tokens table."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def tokens_for(tokenizer_uri: str, tokens_uri: str | None = None, need_features: bool = False):
    """``(tokens table, its URI)`` of a tokenizer artifact: ``tokens_uri`` or the ``tokens`` folder
    beside the artifact (where ``fmrilm tokenize`` writes it); clear errors when it is missing or
    lacks the encoder features the scan token and the features input mode need."""
    uri = tokens_uri or artifact.tokens_location(tokenizer_uri)
    try:
        tokens = read_tokens(uri)
    except (FileNotFoundError, OSError) as err:
        raise TokensMissing(f"no tokens table at {uri}: run `fmrilm tokenize jobs/tokenize.yaml` first ({err})") from None
    if need_features and "features" not in tokens.columns:
        raise UserError(f"the scan token and the features input mode need encoder features in the tokens table {uri}: "
                         "re-run `fmrilm tokenize jobs/tokenize.yaml features=true`")
    return tokens, uri


def scan_codes(tokens, window: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per scan of a tokens table (pandas), the codes of consecutive non-overlapping windows
    joined along time, ``scan_id -> [channels, steps]`` (code indices), and, when the table has
    them, the encoder features the same way, ``scan_id -> [channels, steps, width]``."""
    has_feats = "features" in tokens.columns
    channels = "n_channels" if "n_channels" in tokens.columns else "n_rois"  # tables before the state layout
    codes, feats = {}, {}
    for scan_id, group in tokens.sort_values(["scan_id", "start"]).groupby("scan_id", sort=False):
        blocks, fblocks, end = [], [], -1
        for row in group.itertuples(index=False):
            if row.start >= end:
                c = getattr(row, channels)
                blocks.append(np.asarray(row.codes).reshape(c, row.n_patches))
                if has_feats:
                    fblocks.append(np.asarray(row.features, np.float32).reshape(c, row.n_patches, -1))
                end = row.start + window
        codes[scan_id] = np.concatenate(blocks, axis=1)
        if has_feats:
            feats[scan_id] = np.concatenate(fblocks, axis=1)
    return codes, feats


def codebook_pairs(uri: str, data: PipelineSpec, max_windows: int = 256):
    """Paired examples for mapping the codebook into the text space the tokenizer was aligned to:
    ``(code vectors [n, code_dim], projected encoder features [n, text_dim])`` over up to
    ``max_windows`` training windows, each encoder token paired with its nearest code. ``None``
    when the artifact has no alignment head."""
    import torch
    import torch.nn.functional as F

    objective, cfg = artifact.load_objective(uri)
    data = artifact.windows_like(data, cfg)
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


class ScanBlocks:
    """fMRI blocks of scans for prompts, in the vocabulary of the LM export ``model_uri`` (from
    the tokens table of its tokenizer, or ``tokens_uri``): ``part(scan_id, steps)`` is a
    :func:`~fmrilm.data.lm_sequences.fmri_part` of the scan's first ``steps`` time steps, with
    encoder features in the features input mode and the whole scan's vector when the export
    has the scan token."""

    def __init__(self, model_uri: str, data: str, datasets: list[str] | None, tokens_uri: str | None = None):
        from fmrilm.artifacts.lm import export_meta, root_export
        from fmrilm.models.scan_token import scan_vectors

        meta = export_meta(root_export(model_uri))
        self.vocab = meta["vocab"]
        self.features = meta.get("input_mode") == "features"
        self.scan_token, self.scan_dim = bool(meta.get("scan_dim")), meta.get("scan_dim")
        tokens, self.tokens_uri = tokens_for(meta["tokenizer"], tokens_uri, need_features=self.features or self.scan_token)
        self.tokenizer_cfg = artifact.read_config(meta["tokenizer"])
        self.codes, self.feats = scan_codes(tokens, self.tokenizer_cfg["data"]["window"])
        self.decoder = CodeDecoder(meta["tokenizer"], self.tokenizer_cfg, scan_rois(tokens))
        self.vectors = scan_vectors(self.feats) if self.scan_token else {}

    def seen_timepoints(self, steps: int) -> dict | None:
        """What a prompt of ``steps`` time steps shows of a scan: ``timepoints`` (one step is one
        patch of the tokenizer) counted after resampling to ``target_tr`` (None: the native TR);
        ``None`` (the whole scan) when the scan token summarises all of it."""
        if self.scan_token:
            return None
        return {"timepoints": steps * self.tokenizer_cfg["model"]["patch"], "target_tr": self.tokenizer_cfg["data"]["target_tr"]}

    def part(self, scan_id: str, steps: int):
        if scan_id not in self.codes:
            raise ScanNotTokenized(f"scan {scan_id!r} has no tokens: re-run `fmrilm tokenize` over its dataset")
        c = self.codes[scan_id][:, :steps]
        f = self.feats[scan_id][:, :steps] if self.features else None
        v = self.vocab
        vec = self.vectors.get(scan_id)
        if vec is not None and len(vec) != self.scan_dim:
            raise UserError(f"scan {scan_id!r} has {c.shape[0]} ROIs, but the export's scan token was trained on scans of another "
                                f"ROI count ({self.scan_dim} ROI pairs): evaluate datasets of the atlas it was trained on")
        from fmrilm.data.lm_sequences import fmri_part

        return fmri_part(c, v["first_code_id"], v["open_id"], v["close_id"], f, vec)

    def shuffled(self, axis: Shuffle, seed: int = 0) -> ScanBlocks:
        """These blocks with every scan's codes (and encoder features) shuffled at test time
        (:func:`shuffle_order`); the scan vectors are kept. ``rois`` needs one code per ROI (the
        tokenizer's ``roi`` layout)."""
        import copy

        if axis == "rois" and self.tokenizer_cfg["model"].get("layout", "roi") != "roi":
            raise UserError("codes shuffled over ROIs need one code per ROI, but the tokenizer has one whole-brain code per patch "
                            "(model.layout=state): shuffle over time only")
        rng = np.random.default_rng(seed)
        out = copy.copy(self)
        out.codes, out.feats = {}, {}
        for scan_id in sorted(self.codes):
            order = shuffle_order(self.codes[scan_id].shape, axis, rng)
            out.codes[scan_id] = shuffle_codes(self.codes[scan_id], order)
            if scan_id in self.feats:
                out.feats[scan_id] = shuffle_codes(self.feats[scan_id], order)
        return out


Shuffle = Literal["time", "rois"]


def shuffle_order(shape: tuple[int, ...], axis: Shuffle, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays ``(channel, step)``, each ``[channels, steps]``, that shuffle a scan's codes of
    ``shape`` ``[channels, steps, ...]``: ``time`` permutes each channel's steps on its own (each
    ROI keeps its codes, their co-occurrence across ROIs at a time step is broken); ``rois``
    permutes the channels at each step on its own (each time step keeps its bag of codes, which
    ROI had which code is broken)."""
    channels, steps = shape[:2]
    ch, st = np.indices((channels, steps))
    if axis == "time":
        return ch, rng.permuted(st, axis=1)
    if axis == "rois":
        return rng.permuted(ch, axis=0), st
    raise ValueError(f"unknown shuffle {axis!r}: time or rois")


def shuffle_codes(x: np.ndarray, order: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``x`` ``[channels, steps, ...]`` (codes, or encoder features) reordered by :func:`shuffle_order`."""
    return x[order[0], order[1]]


def summary(result: dict) -> list[str]:
    """Lines a person reads after :func:`run`; the first is the headline (windows, the codes' sex probe)."""
    probes = [f"{r['representation'].split(' (')[0]} {r['metrics']['balanced_accuracy']:.2f}" for r in result.get("probes", [])
              if r["task"] == "sex" and "balanced_accuracy" in r["metrics"]]
    n = next((r["n"] for r in result.get("probes", [])), 0)
    head = f"{result['windows']} windows tokenized" + (f"; sex probe on {n} held-out scans: {', '.join(probes)}" if probes else "")
    return [head, f"tokens table: {result['tokens']}", *(f"warning: {w}" for w in result.get("input_warnings", []))]
