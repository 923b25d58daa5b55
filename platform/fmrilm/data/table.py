"""The scan table on storage: versioned parquet shards + ``manifest.json`` per dataset folder.

Layout::

    <root>/<dataset>/manifest.json              the commit point (one atomic write)
    <root>/<dataset>/v-<version>/part-00000.parquet

    <root>/<dataset>/versions/v-<version>.json  every committed manifest (the history)

Writers put every shard of a new version under a fresh ``v-<version>/`` folder, then commit:
under a short commit lock (``_commit.lock``, created exclusively: ``O_EXCL`` locally, a
conditional PUT on S3) they check that the manifest still names the version they started from
and write the new manifest. A writer that finds another writer's commit in between commits
nothing and is told so (:class:`ConcurrentCommit`); its own folder is removed. Commits never
delete a version: readers stream exactly the shards of the manifest they read, and superseded
versions stay until :func:`gc` removes those older than a grace period.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import os
import posixpath
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fmrilm.errors import UserError
from fmrilm import storage
from fmrilm.data import schema

MANIFEST = "manifest.json"
LOCK = "_commit.lock"
DEFAULT_SHARD_BYTES = 64 * 2**20
LOCK_STALE_S = 120.0  # a commit holds the lock for a few requests; an older lock was left by a killed writer
DEFAULT_GRACE_S = 24 * 3600.0
log = logging.getLogger("fmrilm.table")


class ManifestError(UserError, RuntimeError):
    """A dataset folder has no readable manifest, or its shards disagree with it."""


class NetworkMapMissing(UserError, ValueError):
    """A dataset's manifest has no (complete) ROI->network map."""


class ConcurrentCommit(ManifestError):
    """Another writer committed a version of the dataset after this writer started."""


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


def version_time(version: str) -> float | None:
    """The UTC start time (epoch seconds) encoded in a version name, None if it has none."""
    try:
        return dt.datetime.strptime(version.split("-")[1], "%Y%m%dT%H%M%S").replace(tzinfo=dt.timezone.utc).timestamp()
    except (IndexError, ValueError):
        return None


def _acquire(dataset: storage.Location, timeout_s: float = 60.0) -> dict:
    """Take the dataset's commit lock (waiting for another writer's commit, removing a stale lock)."""
    lock = dataset.join(LOCK)
    me = {"owner": f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}", "at": time.time()}
    deadline = time.monotonic() + timeout_s
    while True:
        if storage.create_exclusive(lock, json.dumps(me).encode()):
            return me
        try:
            text = storage.read_text(lock)
        except FileNotFoundError:
            continue  # released in between
        try:
            held = json.loads(text)
        except json.JSONDecodeError:  # a damaged lock: stale once as old as a stale one, named by its content
            held = {"at": storage.modified_at(lock), "owner": "unreadable-" + hashlib.sha256(text.encode()).hexdigest()[:12]}
        if time.time() - float(held.get("at", 0.0)) > LOCK_STALE_S:
            if storage.take_over(lock, str(held.get("owner", "unreadable")), json.dumps(me).encode()):  # one contender wins
                log.warning("%s: took over a stale commit lock left by %s", dataset.uri, held.get("owner", "a killed writer"))
                storage.drop_takeover_markers(lock)
                return me
            time.sleep(0.2)
            continue
        if time.monotonic() > deadline:
            raise ConcurrentCommit(f"{dataset.uri}: another writer ({held.get('owner')}) holds the commit lock {lock.uri}; "
                                   "re-run once it has finished")
        time.sleep(0.2)


def _release(dataset: storage.Location, me: dict) -> None:
    lock = dataset.join(LOCK)
    try:
        held = json.loads(storage.read_text(lock))
    except (FileNotFoundError, json.JSONDecodeError):
        return
    if held.get("owner") == me["owner"]:
        storage.delete_file(lock)


def commit(dataset: storage.Location, manifest: dict, base_version: str | None) -> dict:
    """Commit ``manifest`` if the dataset's current version is still ``base_version`` (the one this
    writer started from; None: there was none). Writes ``versions/<version>.json`` and then the
    manifest under the commit lock; deletes nothing. Raises :class:`ConcurrentCommit` when
    another writer committed in between."""
    manifest = {**manifest, "schema_version": schema.SCHEMA_VERSION, "previous_version": base_version,
                "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    me = _acquire(dataset)
    try:
        try:
            current = read_manifest(dataset)
        except ManifestError:  # an unreadable or older-schema table is replaced
            current = None
        now = current["version"] if current else None
        if now != base_version:
            raise ConcurrentCommit(
                f"{dataset.uri}: another writer committed version {now} (at {current.get('committed_at') if current else '?'}) "
                f"while this one ran from version {base_version}; this writer's version {manifest['version']} was not committed. "
                "The dataset holds the other writer's complete version: re-run this command if its inputs should replace it")
        text = json.dumps(manifest, indent=2, sort_keys=False)
        record = dataset.join("versions", f"{manifest['version']}.json")
        storage.write_text(record, text)
        try:
            storage.write_text(dataset.join(MANIFEST), text)
        except storage.StorageError:  # not committed: no record of it may say it was
            try:
                storage.delete_file(record)
            except storage.StorageError:
                pass
            raise
    finally:
        _release(dataset, me)
    return manifest


PINS = "pins"
_PINNED: set[str] = set()  # this process's pins that are still live (a failed writer in a process that lives on is not)


def pin(dataset: storage.Location, version: str) -> storage.Location:
    """Record that this process writes or reads ``version`` of ``dataset``
    (``pins/<version>--<token>.json``: host, pid, time), so :func:`gc` leaves that version alone
    whatever the grace period while the process lives; returns the pin for :func:`unpin`."""
    loc = dataset.join(PINS, f"{version}--{uuid.uuid4().hex[:12]}.json")
    storage.write_text(loc, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}))
    _PINNED.add(loc.uri)
    return loc


def unpin(loc: storage.Location) -> None:
    """Remove a pin (best effort: an unreachable store leaves it to :func:`gc`, which sees its owner is gone)."""
    _PINNED.discard(loc.uri)
    try:
        storage.delete_file(loc)
    except storage.StorageError as err:
        log.warning("could not remove the pin %s (%s); `fmrilm data gc` removes it once its owner is gone", loc.uri, err)


@contextmanager
def reading(found: list[tuple[storage.Location, dict]]):
    """Pin the versions of ``found`` (``(dataset location, manifest)`` pairs) while a job streams them."""
    pins = [pin(loc, manifest["version"]) for loc, manifest in found]
    try:
        yield
    finally:
        for p in pins:
            unpin(p)


def _live_pin(dataset: storage.Location, pins: list[str]) -> bool:
    """Whether one of a version's ``pins`` (names in ``pins/``) is held by a live writer or reader:
    its process runs on this host (in this process: it has not unpinned), or, from another host,
    it pinned less than :data:`DEFAULT_GRACE_S` ago."""
    for name in pins:
        loc = dataset.join(PINS, name)
        try:
            rec = json.loads(storage.read_text(loc))
        except (FileNotFoundError, ValueError):
            continue
        if rec.get("host") != socket.gethostname():
            if time.time() - float(rec.get("at", 0)) < DEFAULT_GRACE_S:
                return True
            continue
        if rec.get("pid") == os.getpid():
            if loc.uri in _PINNED:
                return True
            continue
        try:
            os.kill(int(rec["pid"]), 0)
            return True
        except ProcessLookupError:
            continue
        except (PermissionError, KeyError, ValueError):
            return True
    return False


def _replaced_at(dataset: storage.Location) -> dict[str, float]:
    """``version -> when a later commit replaced it`` (epoch seconds), from the ``versions/`` records."""
    out = {}
    for name in storage.list_dir(dataset.join("versions")):
        try:
            rec = json.loads(storage.read_text(dataset.join("versions", name)))
            out[rec["previous_version"]] = dt.datetime.fromisoformat(rec["committed_at"]).timestamp()
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            continue
    out.pop(None, None)
    return out


def gc(dataset: storage.Location, grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False) -> list[str]:
    """Delete the version folders (and their ``versions/`` records and pins) the current manifest
    does not list and no live job pinned (:func:`pin`): a superseded version once ``grace_s``
    seconds have passed since the commit that replaced it (a reader that started on it without a
    pin may still stream it), a version no commit took (an interrupted or failed writer's) once it
    was started more than ``grace_s`` ago. Returns the removed version names."""
    manifest = read_manifest(dataset)
    keep = {s["path"].split("/", 1)[0] for s in manifest["shards"]} if manifest else set()
    now, replaced, all_pins = time.time(), _replaced_at(dataset), storage.list_dir(dataset.join(PINS))
    removed = []
    for name in storage.list_dir(dataset):
        started = version_time(name) if name.startswith("v-") else None
        if started is None or name in keep:
            continue
        pins = [p for p in all_pins if p.startswith(f"{name}--")]
        if now - replaced.get(name, started) < grace_s or _live_pin(dataset, pins):
            continue
        removed.append(name)
        if not dry_run:
            storage.delete_dir(dataset.join(name))
            storage.delete_file(dataset.join("versions", f"{name}.json"))
            for pinned in pins:
                storage.delete_file(dataset.join(PINS, pinned))
    return removed


def shards_of(manifest: dict) -> list[Shard]:
    return [Shard(**s) for s in manifest["shards"]]


def shard_dicts(shards: list[Shard]) -> list[dict]:
    return [asdict(s) for s in shards]


def find_datasets(root_uri: str, names: list[str] | None = None) -> list[tuple[storage.Location, dict]]:
    """Datasets under ``root_uri``: the folder itself if it holds a manifest, else each child
    folder that does (only the folders ``names``, when given: a damaged dataset beside them does not
    stop a job that does not read it). Returns ``(location, manifest)`` pairs sorted by dataset
    name; a named folder without a manifest is left out (the caller says it is unknown)."""
    root = storage.resolve(root_uri)
    own = read_manifest(root)
    if own is not None:
        return [(root, own)] if not names or own["dataset"] in names else []
    found = []
    for name in sorted(names) if names else storage.list_dir(root):
        if name.startswith((".", "_")) or not storage.is_dir(root.join(name)):
            continue  # markers and stray files (".done", "_SUCCESS") are not datasets
        manifest = read_manifest(root.join(name))
        if manifest is not None:
            found.append((root.join(name), manifest))
    if not found and not names:
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


def read_series(loc: storage.Location, manifest: dict, scan_ids: set[str]) -> dict[str, tuple[np.ndarray, float]]:
    """``scan_id -> ([rois, time], TR)`` for the requested scans of a dataset."""
    out = {}
    if not scan_ids:
        return out
    for path in shard_paths(loc, manifest):
        t = pq.read_table(path, filesystem=loc.fs, columns=["scan_id", "n_rois", "n_timepoints", "tr", "timeseries"],
                          filters=[("scan_id", "in", sorted(scan_ids))])
        for row in t.to_pylist():
            out[row["scan_id"]] = (schema.timeseries(row["timeseries"], row["n_rois"], row["n_timepoints"]), row["tr"])
    return out


def networks_of(manifest: dict) -> list[str]:
    """The network of each ROI from the manifest's ROI->network map."""
    mapping, labels = manifest.get("roi_networks"), manifest.get("roi_labels")
    if not mapping or not labels:
        raise NetworkMapMissing(f"dataset {manifest['dataset']!r} has no ROI->network map: add atlas.networks to its dataset card and re-ingest")
    missing = [label for label in labels if label not in mapping]
    if missing:
        raise NetworkMapMissing(f"dataset {manifest['dataset']!r}: ROI(s) {missing[:5]} have no network in roi_networks")
    return [mapping[label] for label in labels]


def series_of(root_uri: str, scan_ids) -> tuple[dict[str, tuple[np.ndarray, float]], dict[str, list[str] | None]]:
    """Every listed scan's series under ``root_uri``, read once: ``scan_id -> ([rois, time], TR)``,
    and its ROIs' networks (``None`` where its dataset's manifest names none)."""
    want = set(scan_ids)
    series, networks = {}, {}
    for loc, manifest in find_datasets(root_uri):
        found = read_series(loc, manifest, want)
        try:
            nets = networks_of(manifest)
        except NetworkMapMissing:
            nets = None
        series |= found
        networks |= {sid: nets for sid in found}
    return series, networks
