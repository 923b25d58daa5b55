"""Ingestion from arrays + phenotype table, idempotence, atomic commits and every bad input."""

import json
import os

import numpy as np
import pytest
import yaml
from scipy.io import savemat

from fmrilm.data import table
from fmrilm.data.ingest import IngestError, ingest, ingest_card, ingest_synthetic
from fmrilm.data.readers import InputError
from tests.conftest import snapshot

N_ROIS, N_T = 5, 40


def _series(seed):
    return np.random.default_rng(seed).normal(100, 5, size=(N_T, N_ROIS))  # [time, rois] on disk


def make_cohort(root, n=4, fmt="npy"):
    """Per-scan arrays in a BIDS-like layout + participants.tsv + a dataset card."""
    for i in range(1, n + 1):
        d = root / "derivatives" / f"sub-{i:02d}" / "func"
        d.mkdir(parents=True, exist_ok=True)
        stem = d / f"sub-{i:02d}_task-rest_run-1_timeseries"
        ts = _series(i)
        if fmt == "npy":
            np.save(f"{stem}.npy", ts)
        elif fmt == "csv":
            np.savetxt(f"{stem}.csv", ts, delimiter=",")
        else:
            savemat(f"{stem}.mat", {"ts": ts})
    (root / "participants.tsv").write_text(
        "participant_id\tAGE\tSEX\tDX\thand\n" + "".join(f"sub-{i:02d}\t{20 + i}\t{'1' if i % 2 else '2'}\t{'ctl' if i < 3 else 'asd'}\tR\n" for i in range(1, n + 1))
    )
    card = {
        "name": "toy", "format": "arrays", "root": "derivatives", "glob": f"sub-*/func/*_timeseries.{fmt}",
        "tr": 2.0, "site": "siteA",
        "atlas": {"name": "toy-5", "labels": [f"R{i}" for i in range(N_ROIS)], "networks": {f"R{i}": "A" if i < 3 else "B" for i in range(N_ROIS)}},
        "arrays": {"layout": "time_by_rois", **({"mat_key": "ts"} if fmt == "mat" else {})},
        "phenotypes": {"file": "participants.tsv", "columns": {"age": "AGE", "sex": "SEX", "diagnosis": "DX"},
                       "diagnosis_values": {"ctl": "Control", "asd": "Autism"}, "extra": ["hand"]},
    }
    path = root / "toy.yaml"
    path.write_text(yaml.safe_dump(card))
    return str(path)


@pytest.mark.parametrize("fmt", ["npy", "csv", "mat"])
def test_ingest_arrays_card(tmp_path, fmt):
    card = make_cohort(tmp_path, fmt=fmt)
    out = tmp_path / "store"
    result = ingest_card(card, str(out), use_ray=False)
    m = result.manifest
    assert result.written and m["rows"] == 4 and m["subjects"] == 4 and m["n_rois"] == N_ROIS
    assert m["roi_labels"] == [f"R{i}" for i in range(N_ROIS)] and m["roi_networks"]["R4"] == "B"
    assert m["split"]["method"] == "hash" and m["quarantined"] == []
    meta = table.read_meta(table.find_datasets(str(out))[0][0], m).to_pandas().sort_values("scan_id")
    assert list(meta["scan_id"]) == [f"toy_sub-{i:02d}_task-rest_run-1" for i in range(1, 5)]
    assert list(meta["sex"]) == ["M", "F", "M", "F"] and list(meta["diagnosis"]) == ["Control", "Control", "Autism", "Autism"]
    assert list(meta["age"]) == [21, 22, 23, 24] and dict(meta["phenotypes"].iloc[0]) == {"hand": "R"}
    assert table.verify(table.find_datasets(str(out))[0][0], m) == []
    # values survive exactly (float32), transposed to [rois, time]
    import pyarrow.parquet as pq

    loc = table.find_datasets(str(out))[0][0]
    t = pq.read_table(table.shard_paths(loc, m)[0], filesystem=loc.fs).to_pylist()[0]
    sub = int(t["subject_id"])
    np.testing.assert_allclose(np.array(t["timeseries"]).reshape(N_ROIS, N_T), _series(sub).T.astype(np.float32), rtol=1e-6)


def test_reingest_is_idempotent_and_changes_replace(tmp_path, small_synth):
    out = str(tmp_path / "store")
    first = ingest_synthetic(small_synth, out, use_ray=False)
    before = snapshot(out)
    again = ingest_synthetic(small_synth, out, use_ray=False)
    assert not again.written and again.manifest["version"] == first.manifest["version"]
    assert snapshot(out) == before  # nothing rewritten, no duplicate rows
    changed = ingest_synthetic(small_synth.model_copy(update={"subjects": 8}), out, use_ray=False)
    assert changed.written and changed.manifest["rows"] == 8
    versions = [n for n in os.listdir(os.path.join(out, "tiny")) if n.startswith("v-")]
    assert versions == [changed.manifest["version"]]  # old version garbage-collected


def test_shards_are_bounded(tmp_path, small_synth):
    params = small_synth.model_copy(update={"subjects": 16})
    from fmrilm.data import synth

    result = ingest(synth.sources(params), str(tmp_path), use_ray=False, shard_bytes=12 * 64 * 4 * 3)
    assert all(s["rows"] <= 3 for s in result.manifest["shards"])
    assert sum(s["rows"] for s in result.manifest["shards"]) == 16


def test_interrupted_ingest_leaves_previous_table(tmp_path, small_synth, monkeypatch):
    out = str(tmp_path / "store")
    ingest_synthetic(small_synth, out, use_ray=False)
    before = snapshot(out)

    calls = {"n": 0}
    real = table.write_shard

    def crash_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **k)

    monkeypatch.setattr(table, "write_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        ingest_synthetic(small_synth.model_copy(update={"subjects": 20}), out, use_ray=False)
    assert snapshot(out) == before


# ---------------------------------------------------------------- bad inputs


def _break(tmp_path, what):
    """Make one kind of bad input in a fresh arrays cohort; return (card, expected message)."""
    card = make_cohort(tmp_path)
    f = lambda i: tmp_path / "derivatives" / f"sub-{i:02d}" / "func" / f"sub-{i:02d}_task-rest_run-1_timeseries.npy"  # noqa: E731
    if what == "unreadable":
        f(2).write_bytes(b"not an array")
        return card, "sub-02_task-rest_run-1_timeseries.npy: unreadable"
    if what == "shape":
        np.save(f(2), np.ones((N_T, N_ROIS + 1)) + np.arange(N_T)[:, None])
        return card, f"has {N_ROIS + 1} ROIs but the atlas has {N_ROIS} labels"
    if what == "nan":
        ts = _series(2)
        ts[3, 1] = np.nan
        np.save(f(2), ts)
        return card, "NaN/Inf values in ROI(s) 1 (R1)"
    if what == "constant":
        ts = _series(2)
        ts[:, 4] = 3.0
        np.save(f(2), ts)
        return card, "ROI(s) 4 (R4) are constant over time"
    if what == "dtype":
        np.save(f(2), np.array([["a"] * N_ROIS] * N_T))
        return card, "expected real numbers, got dtype <U1 (wrong dtype)"
    if what == "duplicate":
        d = tmp_path / "derivatives" / "sub-02" / "func" / "extra"
        d.mkdir()
        np.save(d / "sub-02_task-rest_run-1_timeseries.npy", _series(9))
        spec = yaml.safe_load(open(card))
        spec["glob"] = "sub-*/func/**/*_timeseries.npy"
        open(card, "w").write(yaml.safe_dump(spec))
        return card, "duplicate scan_id 'toy_sub-02_task-rest_run-1'"
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["unreadable", "shape", "nan", "constant", "dtype", "duplicate"])
def test_bad_input_fails_clearly_and_keeps_what_was_written(tmp_path, what):
    out = tmp_path / "store"
    good = make_cohort(tmp_path / "good")
    ingest_card(good, str(out), use_ray=False)  # a previous, good table of the same dataset
    before = snapshot(out)
    card, message = _break(tmp_path / "bad", what)
    with pytest.raises(IngestError) as err:
        ingest_card(card, str(out), use_ray=False)
    assert message in str(err.value)
    assert "nothing was committed" in str(err.value)
    assert snapshot(out) == before


def test_every_bad_input_is_listed_in_one_error(tmp_path):
    card = make_cohort(tmp_path)
    f = lambda i: tmp_path / "derivatives" / f"sub-{i:02d}" / "func" / f"sub-{i:02d}_task-rest_run-1_timeseries.npy"  # noqa: E731
    f(1).write_bytes(b"junk")
    ts = _series(3)
    ts[:, 0] = 1.0
    np.save(f(3), ts)
    with pytest.raises(IngestError) as err:
        ingest_card(card, str(tmp_path / "store"), use_ray=False)
    assert len(err.value.problems) == 2
    assert "sub-01" in str(err.value) and "sub-03" in str(err.value)


def test_quarantine_writes_good_and_records_bad(tmp_path):
    card, _ = _break(tmp_path, "nan")
    result = ingest_card(card, str(tmp_path / "store"), quarantine=True, use_ray=False)
    m = result.manifest
    assert m["rows"] == 3
    assert [q["scan_id"] for q in m["quarantined"]] == ["toy_sub-02_task-rest_run-1"]
    assert "NaN/Inf" in m["quarantined"][0]["reason"]
    on_disk = json.loads((tmp_path / "store" / "toy" / "manifest.json").read_text())
    assert on_disk["rows"] + len(on_disk["quarantined"]) == 4  # counts reconcile, nothing silently dropped


def test_missing_phenotype_column_names_file_and_column(tmp_path):
    card = make_cohort(tmp_path)
    spec = yaml.safe_load(open(card))
    spec["phenotypes"]["columns"]["age"] = "AGE_AT_SCAN"
    open(card, "w").write(yaml.safe_dump(spec))
    with pytest.raises(InputError, match=r"participants.tsv has no column\(s\) \['AGE_AT_SCAN'\]"):
        ingest_card(card, str(tmp_path / "store"), use_ray=False)
    assert not (tmp_path / "store").exists()


def test_bad_phenotype_values_name_the_row(tmp_path):
    card = make_cohort(tmp_path)
    p = tmp_path / "participants.tsv"
    p.write_text(p.read_text().replace("sub-02\t22", "sub-02\ttwenty"))
    with pytest.raises(InputError, match=r"participants.tsv row 3 column 'AGE': age 'twenty' is not a number"):
        ingest_card(card, str(tmp_path / "store"), use_ray=False)


def test_card_errors(tmp_path):
    card = make_cohort(tmp_path)
    with pytest.raises(InputError, match="no file under .* matches"):
        ingest_card(card, str(tmp_path / "store"), overrides=["glob=nothing/*.npy"], use_ray=False)
    from fmrilm.config import ConfigError

    with pytest.raises(ConfigError, match="atlas.labelz: unknown key"):
        ingest_card(card, str(tmp_path / "store"), overrides=["atlas.labelz=[a]"], use_ray=False)
    with pytest.raises(ConfigError, match="needs atlas.labels_img or atlas.maps_img"):
        ingest_card(card, str(tmp_path / "store"), overrides=["format=nifti"], use_ray=False)


def test_verify_detects_a_corrupted_shard(tmp_path, small_synth):
    out = str(tmp_path / "store")
    result = ingest_synthetic(small_synth, out, use_ray=False)
    loc, m = table.find_datasets(out)[0]
    assert table.verify(loc, m) == []
    shard = tmp_path / "store" / "tiny" / m["shards"][0]["path"]
    shard.write_bytes(shard.read_bytes()[:-100])
    problems = [str(p) for p in table.verify(loc, m)]
    assert len(problems) == 1 and "checksum differs from the manifest" in problems[0]
    assert result.manifest["index"]["rows"] == small_synth.subjects


def test_quarantine_records_every_copy_of_a_duplicate(tmp_path):
    card, _ = _break(tmp_path, "duplicate")
    m = ingest_card(card, str(tmp_path / "store"), quarantine=True, use_ray=False).manifest
    assert m["rows"] == 3 and len(m["quarantined"]) == 2
    assert all("duplicate scan_id" in q["reason"] for q in m["quarantined"])
