import numpy as np
import pyarrow as pa
import pytest

from fmrilm.data import schema


def _row(scan_id="d_sub-1", ts=None, **kw):
    ts = np.random.default_rng(0).normal(size=(4, 20)) if ts is None else ts
    return {"scan_id": scan_id, "subject_id": "1", "dataset": "d", "atlas": "a", "tr": 2.0, "timeseries": ts, **kw}


def test_round_trip_keeps_roi_major_layout():
    ts = np.arange(30, dtype=np.float32).reshape(3, 10)  # [rois, time]
    table = schema.rows_to_table([_row(ts=ts + 1, sex="F", age=30.0, phenotypes={"hand": "R"})])
    assert table.schema.metadata[schema.VERSION_KEY] == b"1"
    assert table.column("n_rois")[0].as_py() == 3 and table.column("n_timepoints")[0].as_py() == 10
    back = schema.timeseries(table.column("timeseries")[0].as_py(), 3, 10)
    np.testing.assert_array_equal(back, ts + 1)
    assert dict(table.column("phenotypes")[0].as_py()) == {"hand": "R"}
    assert schema.table_problems(table, "x.parquet") == []


def test_timeseries_problems_name_the_rois():
    ts = np.random.default_rng(1).normal(size=(3, 30))
    labels = ["A", "B", "C"]
    assert schema.timeseries_problems(ts, labels) == []
    nan = ts.copy()
    nan[1, 5] = np.nan
    assert "NaN/Inf values in ROI(s) 1 (B)" in schema.timeseries_problems(nan, labels)[0]
    const = ts.copy()
    const[2] = 7.0
    assert "ROI(s) 2 (C) are constant" in schema.timeseries_problems(const, labels)[0]
    assert "has 3 ROIs but the atlas has 2 labels" in schema.timeseries_problems(ts, ["A", "B"])[0]
    assert "only 5 timepoints" in schema.timeseries_problems(ts[:, :5])[0]
    assert "expected real numbers" in schema.timeseries_problems(ts.astype(complex))[0]
    assert "2-D" in schema.timeseries_problems(ts[0])[0]


def test_table_problems_locate_file_row_and_column():
    rows = [_row("d_sub-1"), _row("d_sub-1"), _row("d_sub-3", sex="X"), _row("d_sub-4", age=-3.0)]
    table = schema.rows_to_table(rows)
    problems = [str(p) for p in schema.table_problems(table, "s3://b/d/part-0.parquet")]
    assert "s3://b/d/part-0.parquet row 1 column 'scan_id': duplicate scan_id 'd_sub-1' (also row 0)" in problems
    assert any(p.startswith("s3://b/d/part-0.parquet row 2 column 'sex'") for p in problems)
    assert any(p.startswith("s3://b/d/part-0.parquet row 3 column 'age'") for p in problems)


def test_shape_mismatch_and_nan_rows():
    table = schema.rows_to_table([_row()])
    bad = table.set_column(table.schema.get_field_index("n_timepoints"), schema.SCAN_SCHEMA.field("n_timepoints"), pa.array([21], pa.int32()))
    assert "has 80 values, n_rois x n_timepoints = 84" in str(schema.table_problems(bad, "f")[0])


def test_schema_version_and_missing_columns():
    table = schema.rows_to_table([_row()])
    old = table.replace_schema_metadata({schema.VERSION_KEY: b"0"})
    assert "schema version 0" in str(schema.schema_problems(old.schema, "f")[0])
    assert "no fmrilm.schema_version" in str(schema.schema_problems(table.replace_schema_metadata({}).schema, "f")[0])
    dropped = table.drop_columns(["tr"])
    assert any(p.column == "tr" and "missing" in p.message for p in schema.schema_problems(dropped.schema, "f"))
    with pytest.raises(schema.SchemaError, match="1 problem"):
        raise schema.SchemaError(schema.schema_problems(old.schema, "f"))
