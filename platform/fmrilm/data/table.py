"""The scan table on storage: versioned parquet shards + ``manifest.json`` per dataset folder.

Layout::

    <root>/<dataset>/manifest.json              the commit point (one atomic write)
    <root>/<dataset>/v-<version>/part-00000.parquet

Writers put every shard of a new version under a fresh ``v-<version>/`` folder, then write the
manifest listing those shards (with row counts and sha256 checksums). Readers read exactly the
shards the manifest lists, so an interrupted ingest leaves the previous table and manifest
intact; unreferenced version folders are removed after the next successful commit.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import posixpath
import uuid
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from fmrilm import storage
from fmrilm.data import schema

MANIFEST = "manifest.json"
DEFAULT_SHARD_BYTES = 64 * 2**20


class ManifestError(RuntimeError):
    """A dataset folder has no readable manifest, or its shards disagree with it."""


@dataclass(frozen=True)
class Shard:
    path: str  # relative to the dataset folder
    rows: int
    bytes: int
    sha256: str


def new_version() -> str:
    """A sortable, unique version folder name."""
    return "v-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def write_shard(table: pa.Table, dataset: storage.Location, rel_path: str) -> Shard:
    """Write one parquet file (zstd) and return its row count, size and sha256."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=256)
    data = buf.getvalue()
    storage.write_bytes(dataset.join(rel_path), data)
    return Shard(rel_path, table.num_rows, len(data), hashlib.sha256(data).hexdigest())


def write_sharded(rows: list[dict], dataset: storage.Location, prefix: str, max_bytes: int = DEFAULT_SHARD_BYTES) -> list[Shard]:
    """Write rows (``timeseries`` as ``[rois, time]``) as shards of at most ~``max_bytes`` raw
    series data each, named ``<prefix>-<k>.parquet``."""
    shards, batch, size = [], [], 0
    for row in rows:
        nbytes = row["timeseries"].size * 4
        if batch and size + nbytes > max_bytes:
            shards.append(write_shard(schema.rows_to_table(batch), dataset, f"{prefix}-{len(shards):03d}.parquet"))
            batch, size = [], 0
        batch.append(row)
        size += nbytes
    if batch:
        shards.append(write_shard(schema.rows_to_table(batch), dataset, f"{prefix}-{len(shards):03d}.parquet"))
    return shards


def read_manifest(dataset: storage.Location) -> dict | None:
    """The dataset's manifest, or None when the folder has none."""
    try:
        text = storage.read_text(dataset.join(MANIFEST))
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{dataset.join(MANIFEST).uri} is not valid JSON: {err}") from err
    version = manifest.get("schema_version")
    if version != schema.SCHEMA_VERSION:
        raise ManifestError(
            f"{dataset.join(MANIFEST).uri} has schema version {version}; this fmrilm reads version "
            f"{schema.SCHEMA_VERSION}: re-ingest the dataset"
        )
    return manifest


def commit(dataset: storage.Location, manifest: dict) -> dict:
    """Write the manifest (the atomic commit), then delete version folders it no longer lists."""
    manifest = {**manifest, "schema_version": schema.SCHEMA_VERSION,
                "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    storage.write_text(dataset.join(MANIFEST), json.dumps(manifest, indent=2, sort_keys=False))
    keep = {s["path"].split("/", 1)[0] for s in manifest["shards"]}
    for name in storage.list_dir(dataset):
        if name.startswith("v-") and name not in keep:
            storage.delete_dir(dataset.join(name))
    return manifest


def shards_of(manifest: dict) -> list[Shard]:
    return [Shard(**s) for s in manifest["shards"]]


def shard_dicts(shards: list[Shard]) -> list[dict]:
    return [asdict(s) for s in shards]


def find_datasets(root_uri: str) -> list[tuple[storage.Location, dict]]:
    """Datasets under ``root_uri``: the folder itself if it holds a manifest, else each child
    folder that does. Returns ``(location, manifest)`` pairs sorted by dataset name."""
    root = storage.resolve(root_uri)
    own = read_manifest(root)
    if own is not None:
        return [(root, own)]
    found = []
    for name in storage.list_dir(root):
        manifest = read_manifest(root.join(name))
        if manifest is not None:
            found.append((root.join(name), manifest))
    if not found:
        raise ManifestError(f"no dataset under {root_uri}: expected {MANIFEST} there or in its sub-folders")
    return found


def shard_paths(dataset: storage.Location, manifest: dict) -> list[str]:
    """Filesystem paths (for ``dataset.fs``) of the shards a manifest lists."""
    return [posixpath.join(dataset.path, s["path"]) for s in manifest["shards"]]


def read_meta(dataset: storage.Location, manifest: dict) -> pa.Table:
    """All scan rows of a dataset without the heavy ``timeseries`` column (for summaries and
    splits): the version's ``index.parquet`` (one read), else the shards' metadata columns."""
    if manifest.get("index"):
        return pq.read_table(posixpath.join(dataset.path, manifest["index"]["path"]), filesystem=dataset.fs)
    tables = [pq.read_table(p, columns=schema.META_COLUMNS, filesystem=dataset.fs) for p in shard_paths(dataset, manifest)]
    return pa.concat_tables(tables) if tables else schema.META_SCHEMA.empty_table()


def verify(dataset: storage.Location, manifest: dict) -> list[schema.Problem]:
    """Re-read every shard: checksums, row counts against the manifest, schema and row contents."""
    problems = []
    files = shards_of(manifest) + ([Shard(**manifest["index"])] if manifest.get("index") else [])
    for shard in files:
        loc = dataset.join(shard.path)
        try:
            data = storage.read_bytes(loc)
        except (FileNotFoundError, storage.StorageError) as err:
            problems.append(schema.Problem(loc.uri, f"listed in the manifest but unreadable ({err})"))
            continue
        if hashlib.sha256(data).hexdigest() != shard.sha256:
            problems.append(schema.Problem(loc.uri, "checksum differs from the manifest (corrupt or replaced shard)"))
            continue
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as err:
            problems.append(schema.Problem(loc.uri, f"is not a readable parquet file ({err})"))
            continue
        if table.num_rows != shard.rows:
            problems.append(schema.Problem(loc.uri, f"has {table.num_rows} rows, the manifest says {shard.rows}"))
        if not shard.path.endswith("/index.parquet"):  # the index holds metadata only
            problems += schema.table_problems(table, loc.uri)
    return problems
