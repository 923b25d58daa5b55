"""Subject-level splits: no subject's data in two splits, one split source for every stage.

A subject's split is a seeded sha256 of ``<dataset>/<subject_id>`` mapped onto the split
fractions, so it never depends on which other subjects, scans or windows exist; or it comes from
an explicit subject -> split file.

The source of truth is the policy each dataset's manifest records at ingest (a card's split
file is frozen into the manifest as its subject -> split assignments). A spec may name another
policy explicitly; the stage records it in its export (:func:`record`) and the stages after it
inherit it. Every export also records the subjects whose data trained it or any stage before
it, and a stage refuses to hold out (validate, evaluate) a subject that trained a model it reads
(:func:`check_unseen`).
"""

from __future__ import annotations

import hashlib
import io
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import model_validator

from fmrilm.errors import UserError
from fmrilm import storage
from fmrilm.config import Strict


class SplitError(UserError, ValueError):
    """A split file or policy is unusable."""


class SplitPolicy(Strict):
    """Subject-level split: seeded hash of subject_id, or an explicit subject -> split file
    (CSV/TSV with columns ``subject_id,split``; ``dataset`` column optional)."""

    method: Literal["hash", "file"] = "hash"
    seed: int = 0
    fractions: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}
    file: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.method == "file" and not self.file:
            raise ValueError("split.method 'file' needs split.file")
        f = self.fractions
        if not f or any(v < 0 for v in f.values()) or abs(sum(f.values()) - 1) > 1e-6:
            raise ValueError(f"split fractions must be non-negative and sum to 1, got {f}")
        return self


def assign_split(subject_id: str, seed: int = 0, fractions: dict[str, float] | None = None) -> str:
    """Deterministic split of a subject: a seeded sha256 of its id mapped onto the fractions."""
    fractions = fractions or {"train": 0.8, "val": 0.1, "test": 0.1}
    u = int.from_bytes(hashlib.sha256(f"{seed}:{subject_id}".encode()).digest()[:8], "big") / 2**64
    acc = 0.0
    for name, frac in fractions.items():
        acc += frac
        if u < acc:
            return name
    return list(fractions)[-1]


def load_split_file(uri: str) -> dict[str, str]:
    """Read ``subject_id -> split`` (optionally keyed ``dataset/subject_id``) from CSV/TSV."""
    raw = storage.read_bytes(storage.resolve(uri))
    df = pd.read_csv(io.BytesIO(raw), sep="," if uri.endswith(".csv") else "\t", dtype=str)
    missing = {"subject_id", "split"} - set(df.columns)
    if missing:
        raise SplitError(f"split file {uri} lacks column(s) {sorted(missing)}")
    dup = df["subject_id"][df.duplicated(["subject_id"] + (["dataset"] if "dataset" in df else []), keep=False)]
    if len(dup):
        raise SplitError(f"split file {uri} lists subject(s) {sorted(set(dup))[:5]} more than once")
    keys = df["dataset"] + "/" + df["subject_id"] if "dataset" in df else df["subject_id"]
    return dict(zip(keys, df["split"]))


def manifest_policy(manifest: dict) -> SplitPolicy:
    """The split policy a dataset's manifest records (the seeded-hash default when it has none)."""
    raw = {k: v for k, v in (manifest.get("split") or {}).items() if k != "assignments"}
    return SplitPolicy(**raw)


def frozen_policy(policy: SplitPolicy) -> dict:
    """What ingest records as a manifest's ``split``: the policy and, for a split file, its
    ``subject_id -> split`` assignments, so no later stage depends on the file."""
    out = policy.model_dump()
    if policy.method == "file":
        out["assignments"] = load_split_file(policy.file)
    return out


def assign(meta: pd.DataFrame, manifests: dict[str, dict], override: SplitPolicy | None = None) -> np.ndarray:
    """The split of each scan row of ``meta`` (columns ``dataset``, ``subject_id``): ``override``
    for every dataset when given, else each dataset's own manifest policy (``manifests`` maps a
    dataset name to its manifest). Subjects a split file does not list get ``"unassigned"``."""
    out = np.empty(len(meta), dtype=object)
    datasets, subjects = meta["dataset"].to_numpy(), meta["subject_id"].to_numpy()
    override_map = load_split_file(override.file) if override is not None and override.method == "file" else None
    for name in pd.unique(datasets):
        rows = datasets == name
        if override is not None:
            policy, mapping = override, override_map
        else:
            manifest = manifests[name]
            policy = manifest_policy(manifest)
            mapping = None
            if policy.method == "file":
                mapping = (manifest.get("split") or {}).get("assignments") or load_split_file(policy.file)
        out[rows] = split_of(policy, subjects[rows], datasets[rows], mapping)
    return out


def subject_keys(meta: pd.DataFrame, splits: tuple[str, ...] | None = None) -> set[str]:
    """``dataset/subject_id`` of the rows (of ``splits`` when given, from a ``split`` column)."""
    rows = meta if splits is None else meta[meta["split"].isin(splits)]
    return {f"{d}/{s}" for d, s in zip(rows["dataset"], rows["subject_id"])}


def record(override: SplitPolicy | None, meta: pd.DataFrame, upstream: list[dict] = (), versions: dict | None = None) -> dict:
    """The split record an export carries: the policy named by the spec (None: each dataset's
    manifest policy), the dataset versions read, and the subjects whose data trained this model
    or any model it builds on (``upstream`` records)."""
    trained = subject_keys(meta, ("train",))
    for up in upstream:
        trained |= set(up.get("trained_subjects") or [])
    return {"policy": override.model_dump() if override is not None else None, "datasets": dict(versions or {}),
            "trained_subjects": sorted(trained)}


def stage_record(policy: SplitPolicy | None, meta: pd.DataFrame, upstream: dict[str, dict | None], what: str,
                 versions: dict | None = None) -> dict:
    """The split record of a stage's run over ``meta`` (a ``split`` column), after refusing to
    hold out (``val``, ``test``) any subject that trained a model or build it reads: ``upstream``
    maps each source (``"the tokenizer s3://..."``) to its split record (None: none recorded);
    ``what`` says what this stage would do with such subjects. Raises :class:`SplitError`."""
    heldout = subject_keys(meta, ("val", "test"))
    for source, rec in upstream.items():
        check_unseen(heldout, rec, what, source)
    return record(policy, meta, [r for r in upstream.values() if r], versions)


def inherited(override: SplitPolicy | None, upstream: dict | None) -> SplitPolicy | None:
    """The policy a stage uses: its spec's, else the one the model it builds on was trained with."""
    if override is not None:
        return override
    policy = (upstream or {}).get("policy")
    return SplitPolicy(**policy) if policy else None


def check_unseen(heldout: set[str], upstream: dict | None, what: str, source: str) -> None:
    """Refuse to hold out subjects that trained the model at ``source`` (its split record
    ``upstream``); ``what`` says what this stage would do with them. Raises :class:`SplitError`."""
    if not upstream:
        return
    overlap = sorted(heldout & set(upstream.get("trained_subjects") or []))
    if overlap:
        shown = ", ".join(overlap[:5]) + (f" and {len(overlap) - 5} more" if len(overlap) > 5 else "")
        raise SplitError(
            f"{len(overlap)} subject(s) that trained {source} would be {what} here ({shown}): use the split that model was "
            f"trained with (leave split unset to inherit it: {upstream.get('policy') or 'each dataset manifest policy'}) "
            "or retrain it on a split that holds these subjects out")


def split_of(policy: SplitPolicy, subject_ids: np.ndarray, datasets: np.ndarray, mapping: dict | None = None) -> np.ndarray:
    """The split of each (subject, dataset); subjects absent from a split file get ``"unassigned"``."""
    if policy.method == "hash":
        return np.array([assign_split(f"{d}/{s}", policy.seed, policy.fractions) for s, d in zip(subject_ids, datasets)], dtype=object)
    return np.array([mapping.get(f"{d}/{s}", mapping.get(s, "unassigned")) for s, d in zip(subject_ids, datasets)], dtype=object)
