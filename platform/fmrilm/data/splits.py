"""Subject-level splits: no subject's data in two splits (DESIGN.md section 2).

A subject's split is a seeded sha256 of ``<dataset>/<subject_id>`` mapped onto the split
fractions, so it never depends on which other subjects, scans or windows exist; or it comes from
an explicit subject -> split file.
"""

from __future__ import annotations

import hashlib
import io
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import model_validator

from fmrilm import storage
from fmrilm.config import Strict


class SplitError(ValueError):
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


def split_of(policy: SplitPolicy, subject_ids: np.ndarray, datasets: np.ndarray, mapping: dict | None = None) -> np.ndarray:
    """The split of each (subject, dataset); subjects absent from a split file get ``"unassigned"``."""
    if policy.method == "hash":
        return np.array([assign_split(f"{d}/{s}", policy.seed, policy.fractions) for s, d in zip(subject_ids, datasets)], dtype=object)
    return np.array([mapping.get(f"{d}/{s}", mapping.get(s, "unassigned")) for s, d in zip(subject_ids, datasets)], dtype=object)
