"""Damaged scan tables: truncated, corrupted, replaced and wrong-version shards. Each one is an
error naming the file (before any training starts where the footer shows it, during streaming
where only the data pages do), never rows silently missing: what is streamed reconciles with the
manifest's row counts, and `fmrilm data verify` names every bad file."""

import json
import os

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from fmrilm.cli import app
from fmrilm.data import schema, table
from fmrilm.data import synth
from fmrilm.data.ingest import ingest
from fmrilm.data.pipeline import PipelineSpec, build_windows, check_shards, train_datasets
from fmrilm.data.synth import SynthParams

from tests.conftest import snapshot

pytestmark = pytest.mark.reliability


@pytest.fixture
def dataset(tmp_path):
    """A 24-scan synthetic table in 8 shards of 3 scans (local), its manifest and the path of each shard."""
    root = tmp_path / "datasets"
    ingest(synth.sources(PARAMS), str(root), use_ray=False, extra=synth.manifest_extra(PARAMS))
    loc, manifest = table.find_datasets(str(root))[0]
    paths = [os.path.join(loc.path, s["path"]) for s in manifest["shards"]]
    assert len(paths) == 8 and {s["rows"] for s in manifest["shards"]} == {3}
    return root, loc, manifest, paths


def _spec(root) -> PipelineSpec:
    return PipelineSpec(root=str(root), window=16, stride=16, split={"fractions": {"train": 1.0}})


PARAMS = SynthParams(name="dmg", subjects=24, n_rois=8, n_networks=2, n_timepoints=48, seed=5)


def _reingest_repairs(root) -> None:
    """What our errors advise (re-ingest the same inputs) ends with a repaired, verifiable table."""
    result = ingest(synth.sources(PARAMS), str(root), use_ray=False, extra=synth.manifest_extra(PARAMS))
    assert result.written
    loc, manifest = table.find_datasets(str(root))[0]
    assert table.verify(loc, manifest) == [] and manifest["rows"] == 24
    check_shards([(loc, manifest)])


def _problems(root) -> list[str]:
    with pytest.raises(schema.SchemaError) as err:
        check_shards(table.find_datasets(str(root)))
    return [str(p) for p in err.value.problems]


def test_streamed_rows_reconcile_with_the_manifest(dataset, ray_cluster):
    root, _, manifest, _ = dataset
    ds, n = build_windows(_spec(root), None)
    rows = ds.take_all()
    assert len(rows) == n == manifest["rows"] * 3  # 48 timepoints / window 16
    assert len({r["scan_id"] for r in rows}) == manifest["rows"]


def test_truncated_shard_is_named_before_anything_streams(dataset):
    root, _, _, paths = dataset
    with open(paths[1], "r+b") as f:
        f.truncate(os.path.getsize(paths[1]) // 2)
    before = snapshot(str(root))
    problems = _problems(root)
    assert len(problems) == 1 and os.path.basename(paths[1]) in problems[0] and "unreadable parquet shard" in problems[0]
    with pytest.raises(schema.SchemaError, match=os.path.basename(paths[1])):
        train_datasets(_spec(root), 2, ("train",))
    assert snapshot(str(root)) == before  # reading never rewrites or deletes anything
    _reingest_repairs(root)


def test_replaced_shard_with_fewer_rows_is_not_a_silent_drop(dataset):
    root, _, manifest, paths = dataset
    shrunk = pq.read_table(paths[0]).slice(0, manifest["shards"][0]["rows"] - 1)
    pq.write_table(shrunk, paths[0])  # a valid scan-table file, one row short
    problems = _problems(root)
    assert problems == [f"{os.path.join(str(root), 'dmg', manifest['shards'][0]['path'])}: has "
                        f"{manifest['shards'][0]['rows'] - 1} rows, the manifest lists {manifest['shards'][0]['rows']}; re-ingest it"]
    _reingest_repairs(root)


def test_shard_with_another_schema_version_is_refused(dataset):
    root, _, _, paths = dataset
    t = pq.read_table(paths[2])
    pq.write_table(t.replace_schema_metadata({**t.schema.metadata, schema.VERSION_KEY: b"2"}), paths[2])
    problems = _problems(root)
    assert len(problems) == 1 and "schema version 2, this fmrilm reads version 1" in problems[0] and paths[2].split("/")[-1] in problems[0]
    _reingest_repairs(root)


def test_manifest_with_another_schema_version_is_refused(dataset):
    root, loc, manifest, _ = dataset
    (root / "dmg" / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(table.ManifestError, match="dmg/manifest.json has schema version 99.*re-ingest"):
        build_windows(_spec(root), None)
    result = ingest(synth.sources(PARAMS), str(root), use_ray=False, extra=synth.manifest_extra(PARAMS))  # what the error says
    assert result.written and table.find_datasets(str(root))[0][1]["schema_version"] == schema.SCHEMA_VERSION


@pytest.mark.parametrize("where", ["values", "page_headers"])
def test_corrupted_data_pages_fail_the_stream_naming_the_shard(dataset, ray_cluster, where):
    """Same size, intact footer, garbage in the column chunks: only reading the data shows it
    (garbage values are caught by the window map, garbage page headers by the parquet reader)."""
    root, _, _, paths = dataset
    data = bytearray(open(paths[1], "rb").read())
    col = pq.read_metadata(paths[1]).row_group(0).column(schema.COLUMNS.index("timeseries"))
    if where == "values":  # the middle of the series' (compressed) page data
        start = col.data_page_offset + col.total_compressed_size // 2
        data[start : start + 8] = b"\xff" * 8
    else:
        data[4:300] = os.urandom(296)
    with open(paths[1], "wb") as f:
        f.write(bytes(data))
    check_shards(table.find_datasets(str(root)))  # the footer is intact
    ds, _ = build_windows(_spec(root), None)
    with pytest.raises(Exception, match=os.path.basename(paths[1])):
        ds.take_all()
    _reingest_repairs(root)


def test_verify_names_every_damaged_file(dataset):
    root, _, _, paths = dataset
    with open(paths[0], "r+b") as f:
        f.seek(os.path.getsize(paths[0]) // 2)
        f.write(b"\x00" * 64)
    os.remove(paths[2])
    r = CliRunner().invoke(app, ["data", "verify", str(root)])
    assert r.exit_code == 1, r.output
    assert "dmg: 24 scans in 8 shard(s)" in r.output and "2 problem(s)" in r.output
    assert f"{os.path.basename(paths[0])}: checksum differs" in r.output.replace("\n", "")
    assert f"{os.path.basename(paths[2])}: listed in the manifest but unreadable" in r.output.replace("\n", "")
    _reingest_repairs(root)
    assert CliRunner().invoke(app, ["data", "verify", str(root)]).exit_code == 0


def test_verify_passes_an_intact_table(dataset):
    root, _, _, _ = dataset
    r = CliRunner().invoke(app, ["data", "verify", str(root)])
    assert r.exit_code == 0 and "intact" in r.output
