"""The Ray Data pipeline: scan table -> validated, normalised, windowed samples for training.

Pure functions (``robust_scale``, ``resample``, ``windows``, ``assign_split``) hold the science;
``build_windows`` wires them into Ray Data: ``read_parquet`` from any URI (the shards the
manifests list), schema validation, subject-level split filtering, per-ROI robust scaling,
optional resampling to a common TR and windowing into ``[rois, window]`` samples.

Ranks must see the same number of batches (DESIGN.md trap 4). Ray Train splits each dataset with
``streaming_split(world, equal=True)``; ``pad_for_ranks`` first pads the window dataset with
``valid = False`` rows to a multiple of the world size, so no real window is dropped and every
rank gets the same row count, hence the same batch count. Losses must weight rows by ``valid``.
"""

from __future__ import annotations

from fractions import Fraction
import queue
import threading
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from fmrilm import storage
from fmrilm.config import Strict
from fmrilm.data import schema, table
from fmrilm.data.splits import SplitPolicy, load_split_file, split_of



class PipelineError(ValueError):
    """The data cannot be streamed as asked (bad split, mixed atlases, invalid shards)."""


class PipelineSpec(Strict):
    """How scans become training windows."""

    data: str = Field("./fmrilm-data", description="URI of a dataset folder or a root of several")
    datasets: list[str] | None = Field(None, description="dataset names to use (default: all)")
    split: SplitPolicy = SplitPolicy()
    normalise: bool = True
    target_tr: float | None = Field(None, gt=0, description="resample every scan to this TR (s)")
    window: int = Field(32, ge=2, description="timepoints per window")
    stride: int = Field(32, ge=1, description="timepoints between window starts")


# ---------------------------------------------------------------- science (pure)


def robust_scale(ts: np.ndarray) -> np.ndarray:
    """Per-ROI robust scaling over time: ``(x - median) / IQR``; ``[rois, time]`` -> same.

    An ROI with zero IQR is only centred (divided by 1), never divided by zero.
    """
    ts = np.asarray(ts, dtype=np.float64)
    med = np.median(ts, axis=-1, keepdims=True)
    q75, q25 = np.percentile(ts, [75, 25], axis=-1, keepdims=True)
    iqr = q75 - q25
    iqr = np.where(iqr > 0, iqr, 1.0)
    return ((ts - med) / iqr).astype(np.float32)


def resample(ts: np.ndarray, tr: float, target_tr: float) -> np.ndarray:
    """Resample ``[rois, time]`` from ``tr`` to ``target_tr`` seconds (polyphase, anti-aliased)."""
    if abs(tr - target_tr) < 1e-6:
        return ts
    from scipy.signal import resample_poly

    ratio = Fraction(tr / target_tr).limit_denominator(100)
    return resample_poly(ts, ratio.numerator, ratio.denominator, axis=-1).astype(np.float32)


def resampled_length(n_timepoints: int, tr: float, target_tr: float | None) -> int:
    """Length of a series of ``n_timepoints`` after :func:`resample`."""
    if target_tr is None or abs(tr - target_tr) < 1e-6:
        return int(n_timepoints)
    ratio = Fraction(tr / target_tr).limit_denominator(100)
    return int(-(-n_timepoints * ratio.numerator // ratio.denominator))


def n_windows(n_timepoints: int, window: int, stride: int) -> int:
    """How many windows :func:`windows` cuts from a series of ``n_timepoints``."""
    return 0 if n_timepoints < window else 1 + (n_timepoints - window) // stride


def windows(ts: np.ndarray, window: int, stride: int) -> np.ndarray:
    """Cut ``[rois, time]`` into ``[n_windows, rois, window]`` with the given stride."""
    n = n_windows(ts.shape[-1], window, stride)
    if n == 0:
        return np.zeros((0, ts.shape[0], window), dtype=ts.dtype)
    starts = np.arange(n) * stride
    return np.stack([ts[:, s : s + window] for s in starts])


# ---------------------------------------------------------------- Ray wiring


def _manifests(spec: PipelineSpec) -> list[tuple[storage.Location, dict]]:
    found = table.find_datasets(spec.data)
    if spec.datasets:
        names = {m["dataset"] for _, m in found}
        unknown = sorted(set(spec.datasets) - names)
        if unknown:
            raise PipelineError(f"dataset(s) {unknown} not found under {spec.data} (have {sorted(names)})")
        found = [(loc, m) for loc, m in found if m["dataset"] in spec.datasets]
    rois = {m["n_rois"] for _, m in found}
    if len(rois) > 1:
        detail = ", ".join(f"{m['dataset']}: {m['n_rois']} ({m['atlas']})" for _, m in found)
        raise PipelineError(f"datasets with different ROI counts cannot share a window stream ({detail}); pick datasets=")
    return found


def check_shards(found: list[tuple[storage.Location, dict]]) -> None:
    """Validate each shard's parquet schema (footers only, read concurrently) before streaming;
    raise naming every bad file."""
    from concurrent.futures import ThreadPoolExecutor

    def check(item) -> list[schema.Problem]:
        loc, path = item
        uri = storage.join(loc.uri, path[len(loc.path):].lstrip("/"))
        try:
            file_schema = pq.read_schema(path, filesystem=loc.fs)
        except (OSError, pa.ArrowException) as err:
            return [schema.Problem(uri, f"unreadable parquet shard ({err})")]
        return schema.schema_problems(file_schema, uri)

    items = [(loc, p) for loc, m in found for p in table.shard_paths(loc, m)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        problems = [p for found_problems in pool.map(check, items) for p in found_problems]
    if problems:
        raise schema.SchemaError(problems, "scan table shards are invalid")


def scan_index(spec: PipelineSpec, found=None) -> pd.DataFrame:
    """One row per scan (no series): ids, shape, TR, phenotypes, split and window count."""
    found = found or _manifests(spec)
    meta = pd.concat([table.read_meta(loc, m).to_pandas() for loc, m in found], ignore_index=True)
    mapping = load_split_file(spec.split.file) if spec.split.method == "file" else None
    meta["split"] = split_of(spec.split, meta["subject_id"].to_numpy(), meta["dataset"].to_numpy(), mapping)
    length = [resampled_length(n, tr, spec.target_tr) for n, tr in zip(meta["n_timepoints"], meta["tr"])]
    meta["n_windows"] = [n_windows(n, spec.window, spec.stride) for n in length]
    return meta


def window_batch(batch: pa.Table, spec: PipelineSpec, keep: set[str]) -> dict[str, np.ndarray]:
    """Ray Data map: scan rows (pyarrow) -> windows ``x [n, rois, window]`` with their ids."""
    xs, scan_ids, subjects, starts = [], [], [], []
    cols = batch.select(["scan_id", "subject_id", "n_rois", "n_timepoints", "tr"]).to_pydict()
    flat = batch.column("timeseries").combine_chunks()
    offsets, values = flat.offsets.to_numpy(), flat.values.to_numpy(zero_copy_only=False)
    for i, sid in enumerate(cols["scan_id"]):
        if sid not in keep:
            continue
        ts = values[offsets[i] : offsets[i + 1]].reshape(cols["n_rois"][i], cols["n_timepoints"][i])
        if not np.isfinite(ts).all():
            raise PipelineError(f"scan {sid!r} has NaN/Inf values: the shard is corrupt; re-ingest it")
        if spec.normalise:
            ts = robust_scale(ts)
        if spec.target_tr is not None:
            ts = resample(ts, cols["tr"][i], spec.target_tr)
        w = windows(ts, spec.window, spec.stride)
        xs.append(w.astype(np.float32))
        scan_ids += [sid] * len(w)
        subjects += [cols["subject_id"][i]] * len(w)
        starts += list(range(0, len(w) * spec.stride, spec.stride))
    n_rois = cols["n_rois"][0] if cols["n_rois"] else 0
    return {
        "x": np.concatenate(xs) if xs else np.zeros((0, n_rois, spec.window), np.float32),
        "scan_id": np.array(scan_ids, dtype=object),
        "subject_id": np.array(subjects, dtype=object),
        "start": np.array(starts, dtype=np.int64),
        "valid": np.ones(len(scan_ids), dtype=bool),
    }


def read_shards(paths: list[str], fs):
    """``ray.data.read_parquet`` of exactly these shard paths.

    Uses Ray Data's V1 parquet datasource: in Ray 2.60 the V2 path (``ListFiles -> ReadFiles``)
    added ~5 s per execution on a 2-core machine (its listing thread pool waits out a 2 s join
    timeout), 8x the whole read of a 15 MB table; we list the files ourselves from the manifest,
    so V2's discovery buys nothing here. Measured by ``fmrilm bench ingest``.
    """
    import ray
    from ray.data import DataContext

    ctx = DataContext.get_current()
    previous = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        # one block per shard: Ray's default split each shard into ~1-scan blocks, which kept
        # the window map from fusing with the read (measured 1.7x slower end to end)
        return ray.data.read_parquet(paths, filesystem=fs, schema=schema.SCAN_SCHEMA, file_extensions=["parquet"],
                                     override_num_blocks=len(paths))
    finally:
        ctx.use_datasource_v2 = previous


def build_windows(spec: PipelineSpec, split: str | None):
    """A Ray Dataset of windows of the scans in ``split`` (None: every scan).

    Columns: ``x`` float32 ``[rois, window]``, ``scan_id``, ``subject_id``, ``start``, ``valid``.
    Returns ``(dataset, n_windows)``; ``n_windows`` is known from the metadata alone.
    """
    found = _manifests(spec)
    check_shards(found)
    index = scan_index(spec, found)
    if split is not None:
        if split not in set(spec.split.fractions) | {"unassigned"}:
            raise PipelineError(f"unknown split {split!r}; the policy defines {sorted(spec.split.fractions)}")
        index = index[index["split"] == split]
    keep = set(index["scan_id"])
    paths = [p for loc, m in found for p in table.shard_paths(loc, m)]
    ds = read_shards(paths, found[0][0].fs)
    if split is not None:  # rows of other splits never reach the window map (no empty batches)
        from ray.data.expressions import col

        ds = ds.filter(expr=col("scan_id").is_in(sorted(keep)))
    ds = ds.map_batches(window_batch, batch_format="pyarrow", fn_kwargs={"spec": spec, "keep": keep},
                        batch_size=scans_per_map_batch(index, spec), zero_copy_batch=True)
    return ds, int(index["n_windows"].sum())


def scans_per_map_batch(index: pd.DataFrame, spec: PipelineSpec, max_bytes: int = 128 * 2**20) -> int | None:
    """Scans per window-map call: a whole shard (None) unless overlapping windows would make
    its output larger than ``max_bytes``."""
    if index.empty:
        return None
    scan_bytes = float((index["n_rois"] * index["n_timepoints"]).mean()) * 4
    inflation = max(1.0, spec.window / spec.stride)
    n = int(max_bytes // max(1.0, scan_bytes * inflation))
    return None if n >= int(index["n_rois"].size) else max(1, n)


def pad_for_ranks(ds, n_rows: int, world_size: int, n_rois: int, window: int):
    """Append ``valid = False`` zero windows so the row count divides ``world_size``."""
    import ray

    pad = (-n_rows) % world_size
    if pad == 0:
        return ds
    filler = ray.data.from_items([
        {"x": np.zeros((n_rois, window), np.float32), "scan_id": "<pad>", "subject_id": "<pad>", "start": -1, "valid": False}
        for _ in range(pad)
    ])
    return ds.union(filler)


def train_datasets(spec: PipelineSpec, world_size: int, splits: tuple[str, ...] = ("train", "val")) -> dict:
    """Datasets for a TorchTrainer: ``{split: padded window dataset}`` plus their sizes.

    Refuses an evaluation split under the name ``train`` (DESIGN.md: no training on eval data).
    """
    if "train" in splits and spec.split.method == "hash" and "train" not in spec.split.fractions:
        raise PipelineError("the split policy has no 'train' split")
    found = _manifests(spec)
    n_rois = found[0][1]["n_rois"]
    out, sizes = {}, {}
    for split in splits:
        ds, n = build_windows(spec, split)
        if n == 0:
            raise PipelineError(f"split {split!r} has no windows (subjects too few, or scans shorter than window={spec.window})")
        out[split] = pad_for_ranks(ds, n, world_size, n_rois, spec.window)
        sizes[split] = n
    return {"datasets": out, "sizes": sizes}


def collate(batch: dict[str, np.ndarray]) -> dict:
    """numpy batch -> ``x [batch, rois, window]`` float32 tensor, ``valid [batch]`` bool tensor,
    ``scan_id``/``start`` as lists (string columns cannot become tensors)."""
    import torch

    return {
        "x": torch.from_numpy(np.require(batch["x"], np.float32, ["C", "W"])),  # copies read-only Arrow views
        "valid": torch.from_numpy(np.asarray(batch["valid"], dtype=bool)),
        "scan_id": list(batch["scan_id"]),
        "start": np.asarray(batch["start"]).tolist(),
    }


def _collate_fn():
    from ray.data.collate_fn import NumpyBatchCollateFn

    class WindowCollate(NumpyBatchCollateFn):
        def __call__(self, batch):
            return collate(batch)

    return WindowCollate()


def torch_batches(shard, batch_size: int, prefetch_batches: int = 2, collate_fn=None) -> Iterator[dict]:
    """Iterate a worker's dataset shard (or a whole Dataset) as torch batches (by default window
    batches, see :func:`collate`; other tables pass their own ``collate_fn``)."""
    return shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate_fn or _collate_fn(), drop_last=False,
                                    prefetch_batches=prefetch_batches)


def epoch_stream(shard, batch_size: int, first_epoch: int, epochs: int, ready: int = 4, collate_fn=None) -> Iterator[tuple[int, int, dict]]:
    """``(epoch, index in epoch, batch)`` for epochs ``first_epoch .. epochs - 1`` of a shard as one stream.

    A background thread keeps up to ``ready`` batches waiting and starts the next epoch's pipeline
    as soon as the current one is drained, so the per-epoch start-up of Ray Data (~0.2 s here)
    overlaps training instead of stalling it. Errors of the producer are raised in the consumer;
    leaving the loop early stops the producer.
    """
    items: queue.Queue = queue.Queue(maxsize=ready)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for epoch in range(first_epoch, epochs):
                for i, batch in enumerate(torch_batches(shard, batch_size, collate_fn=collate_fn)):
                    if not put((epoch, i, batch)):
                        return
            put(done)
        except BaseException as err:  # handed to the consumer
            put(err)

    thread = threading.Thread(target=produce, name="fmrilm-epoch-stream", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
