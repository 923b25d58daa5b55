"""A scan to ingest, before it is read: where it is, whose it is and what is known about it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ScanSource:
    """One scan to ingest. ``kind`` is ``nifti``, ``cifti``, ``array`` or ``synth``; ``uri`` the input file."""

    scan_id: str
    subject_id: str
    dataset: str
    atlas: str
    kind: str
    uri: str
    tr: float | None = None
    session: str | None = None
    run: str | None = None
    task: str | None = None
    site: str | None = None
    age: float | None = None
    sex: str | None = None
    diagnosis: str | None = None
    phenotypes: dict[str, str] = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    problem: str | None = None  # found before reading (file name, phenotype row): the scan is bad

    def row(self, ts: np.ndarray, tr: float) -> dict:
        """The scan-table row for this source with series ``ts`` ``[rois, time]``."""
        return {
            "scan_id": self.scan_id, "subject_id": self.subject_id, "session": self.session,
            "run": self.run, "dataset": self.dataset, "site": self.site, "task": self.task,
            "atlas": self.atlas, "tr": tr, "timeseries": ts, "age": self.age, "sex": self.sex,
            "diagnosis": self.diagnosis, "phenotypes": self.phenotypes,
        }


def make_scan_id(dataset: str, subject: str, session: str | None, task: str | None, run: str | None) -> str:
    """``<dataset>_sub-<s>[_ses-<x>][_task-<t>][_run-<r>]``: unique within a cohort by BIDS."""
    parts = [dataset, f"sub-{subject}"]
    parts += [f"{k}-{v}" for k, v in (("ses", session), ("task", task), ("run", run)) if v]
    return "_".join(parts)
