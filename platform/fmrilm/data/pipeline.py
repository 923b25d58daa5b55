"""The Ray Data pipeline: scan table -> validated, normalised, windowed samples for training.

The science lives in pure modules (:mod:`fmrilm.data.signal`: ``robust_scale``, ``resample``,
``windows``; :mod:`fmrilm.data.splits`); ``build_windows`` wires them into Ray Data: ``read_parquet`` from any URI (the shards the
manifests list), schema validation, subject-level split filtering, per-ROI robust scaling,
optional resampling to a common TR and windowing into ``[rois, window]`` samples.

Ranks must see the same number of batches, or an all-reduce hangs. Ray Train splits each dataset with
``streaming_split(world, equal=True)``; ``pad_for_ranks`` first pads the window dataset with
``valid = False`` rows to a multiple of the world size, so no real window is dropped and every
rank gets the same row count, hence the same batch count. Losses must weight rows by ``valid``.
"""

from __future__ import annotations

import posixpath
import queue
import threading
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from fmrilm.errors import UserError
from fmrilm import storage
from fmrilm.config import Strict
from fmrilm.data import schema, table
from fmrilm.data import splits
from fmrilm.data.contract import AtlasMapping
from fmrilm.data.signal import n_windows, resample, resampled_length, robust_scale, windows
from fmrilm.data.splits import SplitPolicy


class PipelineError(UserError, ValueError):
    """The data cannot be streamed as asked (bad split, mixed atlases, invalid shards)."""


class DataSpec(Strict):
    """Which scans a stage reads: ``data: {root, datasets, split}``, the same in every stage spec."""

    root: str = Field("./fmrilm-data/datasets", description="URI of a dataset folder or a root of several")
    datasets: list[str] | None = Field(None, description="dataset names to use (default: all)")
    split: SplitPolicy | None = Field(None, description="override every dataset's own split policy (the manifest's); "
                                      "a stage that builds on a model inherits that model's")

    @model_validator(mode="before")
    @classmethod
    def _old_shape(cls, value):
        if isinstance(value, str):
            raise ValueError(f"data is a mapping: write data.root={value} (and data.datasets, data.split)")
        if isinstance(value, dict) and "data" in value:
            raise ValueError("data.data is now data.root")
        return value


class PipelineSpec(DataSpec):
    """Which scans (``root``, ``datasets``, ``split``) and how they become training windows."""

    normalise: bool = True
    target_tr: float | None = Field(None, gt=0, description="resample every scan to this TR (s)")
    window: int = Field(32, ge=2, description="timepoints per window")
    stride: int = Field(32, ge=1, description="timepoints between window starts")
    atlas_mapping: AtlasMapping = Field("refuse", description="datasets of an atlas other than the tokenizer's: refuse, or "
                                        "position (ROI i read as the training atlas's ROI i)")


# ---------------------------------------------------------------- Ray wiring


def selected_datasets(spec: PipelineSpec) -> list[tuple[storage.Location, dict]]:
    """``[(dataset location, manifest)]`` of the datasets the spec reads; raises
    :class:`PipelineError` for unknown names or mixed ROI counts."""
    found = table.find_datasets(spec.root, spec.datasets)
    if spec.datasets:
        unknown = sorted(set(spec.datasets) - {m["dataset"] for _, m in found})
        if unknown:
            try:
                have = sorted(m["dataset"] for _, m in table.find_datasets(spec.root))
            except table.ManifestError as err:  # another dataset there is damaged
                have = f"a damaged dataset among them: {err}"
            raise PipelineError(f"dataset(s) {unknown} not found under {spec.root} (have {have})")
    rois = {m["n_rois"] for _, m in found}
    if len(rois) > 1:
        detail = ", ".join(f"{m['dataset']}: {m['n_rois']} ({m['atlas']})" for _, m in found)
        raise PipelineError(f"datasets with different ROI counts cannot share a window stream ({detail}); pick data.datasets=")
    return found


def check_shards(found: list[tuple[storage.Location, dict]]) -> None:
    """Check every shard against its manifest before streaming (footers only, read concurrently):
    readable parquet, the scan-table schema and version, and the row count the manifest lists,
    so a truncated or replaced shard is an error naming the file, never rows silently missing.
    Raises :class:`fmrilm.data.schema.SchemaError` listing every bad file."""
    from concurrent.futures import ThreadPoolExecutor

    def check(item) -> list[schema.Problem]:
        loc, shard = item
        uri = storage.join(loc.uri, shard["path"])
        try:
            meta = pq.read_metadata(posixpath.join(loc.path, shard["path"]), filesystem=loc.fs)
        except FileNotFoundError:
            return [schema.Problem(uri, "is listed in the manifest but missing")]
        except (OSError, pa.ArrowException) as err:
            return [schema.Problem(uri, f"unreadable parquet shard ({err}); run `fmrilm data verify` and re-ingest")]
        problems = schema.schema_problems(meta.schema.to_arrow_schema(), uri)
        if meta.num_rows != shard["rows"]:
            problems.append(schema.Problem(uri, f"has {meta.num_rows} rows, the manifest lists {shard['rows']}; re-ingest it"))
        return problems

    items = [(loc, shard) for loc, m in found for shard in m["shards"]]
    with ThreadPoolExecutor(max_workers=16) as pool:
        problems = [p for found_problems in pool.map(check, items) for p in found_problems]
    if problems:
        raise schema.SchemaError(problems, "scan table shards disagree with their manifests")


def split_names(spec: PipelineSpec, found) -> set[str]:
    """The split names the policies in force define (the override's, else each manifest's)."""
    if spec.split is not None:
        return set(spec.split.fractions) | {"unassigned"}
    names = {"unassigned"}
    for _, m in found:
        policy = splits.manifest_policy(m)
        if policy.method == "hash":
            names |= set(policy.fractions)
        else:  # the assignments frozen at ingest (a manifest written before that: the file itself)
            names |= set(((m.get("split") or {}).get("assignments") or splits.load_split_file(policy.file)).values())
    return names


def dataset_versions(found) -> dict[str, str]:
    """``dataset -> version`` of the datasets read."""
    return {m["dataset"]: m["version"] for _, m in found}


def scan_index(spec: PipelineSpec, found=None) -> pd.DataFrame:
    """One row per scan (no series): ids, shape, TR, phenotypes, split and window count. The split
    is the spec's policy when it names one, else each dataset's manifest policy."""
    found = found or selected_datasets(spec)
    meta = pd.concat([table.read_meta(loc, m).to_pandas() for loc, m in found], ignore_index=True)
    meta["split"] = splits.assign(meta, {m["dataset"]: m for _, m in found}, spec.split)
    length = [resampled_length(n, tr, spec.target_tr) for n, tr in zip(meta["n_timepoints"], meta["tr"])]
    meta["n_windows"] = [n_windows(n, spec.window, spec.stride) for n in length]
    return meta


def window_batch(batch: pa.Table, spec: PipelineSpec, keep: set[str]) -> dict[str, np.ndarray]:
    """Ray Data map: scan rows (pyarrow) -> windows ``x [n, rois, window]`` with their ids."""
    xs, scan_ids, subjects, starts = [], [], [], []
    cols = batch.select(["scan_id", "subject_id", "n_rois", "n_timepoints", "tr"]).to_pydict()
    shard = batch.column("path") if "path" in batch.column_names else None
    flat = batch.column("timeseries").combine_chunks()
    offsets, values = flat.offsets.to_numpy(), flat.values.to_numpy(zero_copy_only=False)
    for i, sid in enumerate(cols["scan_id"]):
        if sid not in keep:
            continue
        ts = values[offsets[i] : offsets[i + 1]].reshape(cols["n_rois"][i], cols["n_timepoints"][i])
        if not np.isfinite(ts).all():
            where = f" in {shard[i]}" if shard is not None else ""
            raise PipelineError(f"scan {sid!r}{where} has NaN/Inf values: the shard is corrupt; check it with "
                                "`fmrilm data verify` and re-ingest the dataset")
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


def read_shard(shard: dict, fs) -> pa.Table:
    """One manifest-listed shard (``{"path", "uri", "rows"}``) as a scan table plus a ``path``
    column (its URI). An unreadable file or a row count other than the manifest's is a
    :class:`PipelineError` naming the file, never wrong or missing rows (``fmrilm data verify``
    also compares every shard's sha256 with the manifest)."""
    uri = shard["uri"]
    try:
        t = pq.read_table(shard["path"], filesystem=fs, schema=schema.SCAN_SCHEMA)
    except FileNotFoundError as err:
        raise PipelineError(f"{uri}: listed in the manifest but missing; re-ingest the dataset") from err
    except (OSError, pa.ArrowException) as err:
        if storage.unreachable(err):
            raise storage.StorageError(f"cannot read {uri}: {type(err).__name__}: {err}") from err
        raise PipelineError(f"{uri}: unreadable parquet shard ({err}); check it with `fmrilm data verify` "
                            "and re-ingest the dataset") from err
    if t.num_rows != shard["rows"]:
        raise PipelineError(f"{uri}: has {t.num_rows} rows, the manifest lists {shard['rows']}; re-ingest the dataset")
    return t.append_column("path", pa.array([uri] * t.num_rows, pa.string()))


def read_shards(shards: list[dict], fs):
    """A Ray Dataset of exactly these shards (:func:`read_shard`): one read task and one block per
    shard, which fuse with the window map that follows.

    Our own datasource rather than ``ray.data.read_parquet``: each shard's row count is checked
    against its manifest entry as it is read, and every error names the file (``read_parquet``'s
    V1 path reports a decode error without the file; its V2 path added ~5 s per execution on a
    2-core machine in Ray 2.60). Reading whole objects to check their sha256 here cost 2.7x in
    ``fmrilm bench ingest``; ``fmrilm data verify`` does that instead.
    """
    import ray
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ShardDatasource(Datasource):  # Ray's extension point for a custom read
        def get_name(self) -> str:
            return "ScanShards"

        def estimate_inmemory_data_size(self) -> int:
            return sum(int(s.get("bytes") or 0) for s in shards)

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            return [ReadTask(lambda shard=shard: [read_shard(shard, fs)],
                             BlockMetadata(num_rows=shard["rows"], size_bytes=shard.get("bytes"), exec_stats=None,
                                           input_files=(shard["uri"],)))
                    for shard in shards]

    return ray.data.read_datasource(ShardDatasource(), override_num_blocks=max(1, len(shards)))


def build_windows(spec: PipelineSpec, split: str | None):
    """A Ray Dataset of windows of the scans in ``split`` (None: every scan).

    Columns: ``x`` float32 ``[rois, window]``, ``scan_id``, ``subject_id``, ``start``, ``valid``.
    Returns ``(dataset, n_windows)``; ``n_windows`` is known from the metadata alone.
    """
    found = selected_datasets(spec)
    check_shards(found)
    index = scan_index(spec, found)
    if split is not None:
        known = split_names(spec, found)
        if split not in known:
            raise PipelineError(f"unknown split {split!r}; the split policy defines {sorted(known)}")
        index = index[index["split"] == split]
    keep = set(index["scan_id"])
    shards = [{"path": posixpath.join(loc.path, sh["path"]), "uri": storage.join(loc.uri, sh["path"]),
               "rows": sh["rows"], "bytes": sh.get("bytes")} for loc, m in found for sh in m["shards"]]
    ds = read_shards(shards, found[0][0].fs)
    if split is not None:  # rows of other splits never reach the window map (no empty batches)
        from ray.data.expressions import col

        ds = ds.filter(expr=col("scan_id").is_in(sorted(keep)))
    ds = ds.map_batches(window_batch, batch_format="pyarrow", fn_kwargs={"spec": spec, "keep": keep},
                        batch_size=scans_per_map_batch(index, spec), zero_copy_batch=True)
    return ds, int(index["n_windows"].sum())


def sample_windows(spec: PipelineSpec, split: str | None, max_windows: int = 256) -> np.ndarray:
    """Up to ``max_windows`` normalised windows of ``split`` (None: every scan), ``[n, rois, window]``,
    the first ones the stream yields; ``[0, 0, window]`` when there is none."""
    ds, n = build_windows(spec, split)
    if n == 0:
        return np.zeros((0, 0, spec.window), np.float32)
    xs = [b["x"] for b in ds.select_columns(["x"]).limit(max_windows).iter_batches(batch_size=max_windows, batch_format="numpy")]
    return np.concatenate(xs) if xs else np.zeros((0, 0, spec.window), np.float32)


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


def train_datasets(spec: PipelineSpec, world_size: int, names: tuple[str, ...] = ("train", "val")) -> dict:
    """Datasets for a TorchTrainer: ``{split: padded window dataset}`` plus their sizes.

    Refuses an evaluation split under the name ``train`` (no training on evaluation data).
    """
    found = selected_datasets(spec)
    if "train" in names and "train" not in split_names(spec, found):
        raise PipelineError("the split policy has no 'train' split")
    n_rois = found[0][1]["n_rois"]
    out, sizes = {}, {}
    for split in names:
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


def torch_batches(shard, batch_size: int, prefetch_batches: int = 2, collate_fn=None, pin_memory: bool = False) -> Iterator[dict]:
    """Iterate a worker's dataset shard (or a whole Dataset) as torch batches (by default window
    batches, see :func:`collate`; other tables pass their own ``collate_fn``), in pinned host
    memory with ``pin_memory`` (for non-blocking copies to a GPU)."""
    return shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate_fn or _collate_fn(), drop_last=False,
                                    prefetch_batches=prefetch_batches, pin_memory=pin_memory)


def epoch_stream(shard, batch_size: int, first_epoch: int, epochs: int, ready: int = 4, collate_fn=None,
                 pin_memory: bool = False) -> Iterator[tuple[int, int, dict]]:
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
                for i, batch in enumerate(torch_batches(shard, batch_size, collate_fn=collate_fn, pin_memory=pin_memory)):
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


def scan_meta(data: str, datasets: list[str] | None, split: SplitPolicy | None = None) -> pd.DataFrame:
    """The scan index (ids, phenotypes, subject-level split by ``split``, else each dataset's
    manifest policy) of the datasets under ``data``, with ``attrs["versions"]`` (dataset -> version)."""
    spec = PipelineSpec(root=data, datasets=datasets, split=split)
    found = selected_datasets(spec)
    meta = scan_index(spec, found)
    meta.attrs["versions"] = dataset_versions(found)
    return meta
