"""The scan table: one parquet row per scan.

``timeseries`` is stored as a flat ``list<float32>`` in ROI-major order together with the shape
columns ``n_rois`` and ``n_timepoints``: ``np.asarray(flat).reshape(n_rois, n_timepoints)``
gives ``[rois, time]``. (A fixed-shape Arrow tensor cannot hold scans of different lengths.)

The schema version lives in the parquet metadata (``fmrilm.schema_version``) and in each
dataset's ``manifest.json``; readers refuse a version they do not know.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from fmrilm.errors import UserError

SCHEMA_VERSION = 1
VERSION_KEY = b"fmrilm.schema_version"
SEXES = ("M", "F")
TR_RANGE = (0.05, 30.0)  # seconds, (low, high]: fMRI repetition times outside it are unit or header errors
AGE_RANGE = (0.0, 120.0)  # years

_FIELDS = [
    pa.field("scan_id", pa.string(), nullable=False),
    pa.field("subject_id", pa.string(), nullable=False),
    pa.field("session", pa.string()),
    pa.field("run", pa.string()),
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("site", pa.string()),
    pa.field("task", pa.string()),
    pa.field("atlas", pa.string(), nullable=False),
    pa.field("n_rois", pa.int32(), nullable=False),
    pa.field("n_timepoints", pa.int32(), nullable=False),
    pa.field("tr", pa.float32(), nullable=False),
    pa.field("timeseries", pa.list_(pa.float32()), nullable=False),
    pa.field("age", pa.float32()),
    pa.field("sex", pa.string()),
    pa.field("diagnosis", pa.string()),
    pa.field("phenotypes", pa.map_(pa.string(), pa.string())),
]

SCAN_SCHEMA = pa.schema(
    _FIELDS,
    metadata={VERSION_KEY: str(SCHEMA_VERSION).encode(), b"fmrilm.timeseries_layout": b"flat roi-major"},
)
COLUMNS = [f.name for f in _FIELDS]
META_COLUMNS = [c for c in COLUMNS if c != "timeseries"]
META_SCHEMA = pa.schema([f for f in _FIELDS if f.name != "timeseries"], metadata=SCAN_SCHEMA.metadata)


class SchemaError(UserError, ValueError):
    """One or more rows/files break the scan-table contract; ``problems`` lists each one."""

    def __init__(self, problems: list["Problem"], header: str = "scan table is invalid"):
        self.problems = problems
        lines = [f"{header} ({len(problems)} problem{'s' * (len(problems) != 1)}):"]
        lines += [f"  - {p}" for p in problems[:50]]
        if len(problems) > 50:
            lines.append(f"  ... and {len(problems) - 50} more")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Problem:
    """One violation, located by source (file/URI), row index and column."""

    source: str
    message: str
    row: int | None = None
    column: str | None = None

    def __str__(self) -> str:
        where = self.source
        if self.row is not None:
            where += f" row {self.row}"
        if self.column:
            where += f" column {self.column!r}"
        return f"{where}: {self.message}"


def timeseries_problems(ts: np.ndarray, roi_labels: list[str] | None = None, min_timepoints: int = 8) -> list[str]:
    """Check one scan's ``[rois, time]`` array; return human-readable problems (empty if fine)."""
    if not isinstance(ts, np.ndarray) or ts.ndim != 2:
        return [f"expected a 2-D [rois, time] array, got shape {getattr(ts, 'shape', None)}"]
    if not np.issubdtype(ts.dtype, np.number) or np.issubdtype(ts.dtype, np.complexfloating):
        return [f"expected real numbers, got dtype {ts.dtype}"]
    problems = []
    n_rois, n_t = ts.shape
    if roi_labels is not None and n_rois != len(roi_labels):
        problems.append(f"has {n_rois} ROIs but the atlas has {len(roi_labels)} labels")
    if n_t < min_timepoints:
        problems.append(f"has only {n_t} timepoints (need at least {min_timepoints})")
    bad = ~np.isfinite(ts)
    if bad.any():
        rois = np.flatnonzero(bad.any(axis=1))
        problems.append(f"contains {int(bad.sum())} NaN/Inf values in ROI(s) {_name_rois(rois, roi_labels)}")
    elif n_t > 1:
        const = np.flatnonzero(np.ptp(ts, axis=1) == 0)
        if const.size:
            problems.append(f"ROI(s) {_name_rois(const, roi_labels)} are constant over time")
    return problems


def tr_problem(tr) -> str | None:
    """Why a repetition time (seconds) is implausible, or None when it is within :data:`TR_RANGE`."""
    try:
        ok = tr is not None and np.isfinite(tr) and TR_RANGE[0] < float(tr) <= TR_RANGE[1]
    except TypeError:
        ok = False
    return None if ok else f"TR {tr} s is outside ({TR_RANGE[0]}, {TR_RANGE[1]}] s (a unit or header error? set tr in the dataset card)"


def scan_problems(ts: np.ndarray, tr, roi_labels: list[str] | None, labels_given: bool) -> list[str]:
    """Every check a scan must pass before it is stored (on the array as stored, float32):
    :func:`timeseries_problems`, a plausible TR, at least one ROI, and no more ROIs than
    timepoints unless the ROI labels are given (more looks like a transposed array)."""
    problems = timeseries_problems(ts, roi_labels)
    if isinstance(ts, np.ndarray) and ts.ndim == 2:
        n_rois, n_t = ts.shape
        if n_rois == 0:
            problems.append("has 0 ROIs")
        elif n_rois > n_t and not labels_given:
            problems.append(f"has more ROIs ({n_rois}) than timepoints ({n_t}) and the card names no ROI labels: the array is "
                            "probably transposed (check arrays.layout) or give atlas.labels")
    if (p := tr_problem(tr)) is not None:
        problems.append(p)
    return problems


def _name_rois(idx: np.ndarray, labels: list[str] | None, limit: int = 8) -> str:
    names = [f"{i}" + (f" ({labels[i]})" if labels and i < len(labels) else "") for i in idx[:limit]]
    return ", ".join(names) + (f" and {idx.size - limit} more" if idx.size > limit else "")


def schema_problems(schema: pa.Schema, source: str) -> list[Problem]:
    """Compare a file's schema to the contract: version, missing columns, wrong types."""
    problems = []
    meta = schema.metadata or {}
    version = meta.get(VERSION_KEY)
    if version is None:
        problems.append(Problem(source, "has no fmrilm.schema_version metadata: not written by fmrilm ingest"))
    elif version.decode() != str(SCHEMA_VERSION):
        problems.append(
            Problem(source, f"has schema version {version.decode()}, this fmrilm reads version {SCHEMA_VERSION}; re-ingest it")
        )
    for field in _FIELDS:
        idx = schema.get_field_index(field.name)
        if idx < 0:
            problems.append(Problem(source, "is missing", column=field.name))
        elif not schema.field(idx).type.equals(field.type):
            problems.append(Problem(source, f"has type {schema.field(idx).type}, expected {field.type}", column=field.name))
    return problems


def table_problems(table: pa.Table, source: str, row_offset: int = 0) -> list[Problem]:
    """Validate every row of a scan table: schema, shapes, finiteness, ids, phenotype values."""
    problems = schema_problems(table.schema, source)
    if problems:
        return problems
    cols = table.select(META_COLUMNS).to_pydict()
    flat = table.column("timeseries").combine_chunks()
    offsets = flat.offsets.to_numpy()
    values = flat.values.to_numpy(zero_copy_only=False)
    seen: dict[str, int] = {}
    for i in range(table.num_rows):
        row = row_offset + i
        for name in ("scan_id", "subject_id", "dataset", "atlas"):
            if not cols[name][i]:
                problems.append(Problem(source, "is empty", row, name))
        sid = cols["scan_id"][i]
        if sid in seen:
            problems.append(Problem(source, f"duplicate scan_id {sid!r} (also row {seen[sid]})", row, "scan_id"))
        seen[sid] = row
        n_r, n_t = cols["n_rois"][i], cols["n_timepoints"][i]
        length = int(offsets[i + 1] - offsets[i])
        if length != n_r * n_t:
            problems.append(Problem(source, f"has {length} values, n_rois x n_timepoints = {n_r * n_t}", row, "timeseries"))
            continue
        ts = values[offsets[i] : offsets[i + 1]].reshape(n_r, n_t)
        problems += [Problem(source, f"scan {sid!r} {msg}", row, "timeseries") for msg in timeseries_problems(ts)]
        if (p := tr_problem(cols["tr"][i])) is not None:
            problems.append(Problem(source, p, row, "tr"))
        if cols["sex"][i] is not None and cols["sex"][i] not in SEXES:
            problems.append(Problem(source, f"sex must be one of {SEXES} or null, got {cols['sex'][i]!r}", row, "sex"))
        age = cols["age"][i]
        if age is not None and not (np.isfinite(age) and AGE_RANGE[0] <= age <= AGE_RANGE[1]):
            problems.append(Problem(source, f"age {age} is not a plausible age in years", row, "age"))
    return problems


def timeseries(flat, n_rois: int, n_timepoints: int) -> np.ndarray:
    """Turn a stored flat series into ``[rois, time]`` float32."""
    return np.asarray(flat, dtype=np.float32).reshape(int(n_rois), int(n_timepoints))


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Build a scan table from row dicts whose ``timeseries`` is a ``[rois, time]`` array."""
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    for row in rows:
        ts = np.ascontiguousarray(row["timeseries"], dtype=np.float32)
        for c in COLUMNS:
            if c == "timeseries":
                cols[c].append(ts.ravel())
            elif c == "n_rois":
                cols[c].append(ts.shape[0])
            elif c == "n_timepoints":
                cols[c].append(ts.shape[1])
            elif c == "phenotypes":
                cols[c].append(list((row.get(c) or {}).items()))
            else:
                cols[c].append(row.get(c))
    arrays = []
    for field in _FIELDS:
        if field.name == "timeseries":
            lengths = np.array([a.size for a in cols["timeseries"]], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32 if lengths.sum() < 2**31 else np.int64)
            values = np.concatenate(cols["timeseries"]) if rows else np.zeros(0, np.float32)
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float32())))
        else:
            arrays.append(pa.array(cols[field.name], type=field.type))
    return pa.Table.from_arrays(arrays, schema=SCAN_SCHEMA)


def meta_row(row: dict) -> dict:
    """The metadata of a scan row (everything but the series), for the dataset index."""
    ts = row["timeseries"]
    out = {c: row.get(c) for c in META_COLUMNS}
    out["n_rois"], out["n_timepoints"] = int(ts.shape[0]), int(ts.shape[1])
    out["phenotypes"] = list((row.get("phenotypes") or {}).items())
    return out


def meta_table(rows: list[dict]) -> pa.Table:
    """An index table (``META_SCHEMA``) from :func:`meta_row` dicts."""
    return pa.Table.from_pylist(rows, schema=META_SCHEMA)
