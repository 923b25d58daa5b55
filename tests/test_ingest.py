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
    versions = sorted(n for n in os.listdir(os.path.join(out, "tiny")) if n.startswith("v-"))
    assert versions == sorted([first.manifest["version"], changed.manifest["version"]])  # commits delete nothing
    loc = table.find_datasets(out)[0][0]
    assert table.gc(loc) == []  # within the grace period a reader may still stream the old version
    assert table.gc(loc, grace_s=0) == [first.manifest["version"]]
    assert [n for n in os.listdir(os.path.join(out, "tiny")) if n.startswith("v-")] == [changed.manifest["version"]]
    assert table.verify(loc, table.read_manifest(loc)) == []


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
    if what == "run-01 beside run-1":
        np.save(f(2).parent / "sub-02_task-rest_run-01_timeseries.npy", _series(9))
        return card, "duplicate scan_id 'toy_sub-02_task-rest_run-01'"
    if what == "space in a name":
        np.save(f(2).parent / "sub-02_task-rest_run-2_timeseries copy.npy", _series(9))
        spec = yaml.safe_load(open(card))
        spec["glob"] = "sub-*/func/*_timeseries*.npy"
        open(card, "w").write(yaml.safe_dump(spec))
        return card, "its name has white space, which would cut its scan id short"
    if what == "device":
        f(2).unlink()
        f(2).symlink_to("/dev/zero")
        return card, "not a regular file (/dev/zero is a device, pipe or socket)"
    if what == "header of numbers":
        spec = yaml.safe_load(open(card))
        spec["glob"], spec["arrays"]["header"] = "sub-*/func/*_timeseries.csv", True
        open(card, "w").write(yaml.safe_dump(spec))
        for i in range(1, 5):
            np.savetxt(str(f(i)).replace(".npy", ".csv"), _series(i), delimiter=",")
        return card, "arrays.header is true but its first row is numbers"
    if what == "giant phenotype cell":
        table = tmp_path / "participants.tsv"
        table.write_text(table.read_text().replace("\tR\n", "\t" + "R" * 5000 + "\n", 1))
        return card, "over 4096 characters in one cell"
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["unreadable", "shape", "nan", "constant", "dtype", "duplicate", "run-01 beside run-1", "space in a name",
                                  "device", "header of numbers", "giant phenotype cell"])
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
    with pytest.raises(IngestError, match=r"participants.tsv row 3 column 'AGE': age 'twenty' is not a number"):
        ingest_card(card, str(tmp_path / "store"), use_ray=False)
    m = ingest_card(card, str(tmp_path / "store"), quarantine=True, use_ray=False).manifest  # a phenotype cell is per-scan
    assert m["rows"] == 3 and [q["scan_id"] for q in m["quarantined"]] == ["toy_sub-02_task-rest_run-1"]


def _edit(card, **changes):
    spec = yaml.safe_load(open(card))
    for key, value in changes.items():
        node = spec
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    open(card, "w").write(yaml.safe_dump(spec))


def _npy(tmp_path, i):
    return tmp_path / "derivatives" / f"sub-{i:02d}" / "func" / f"sub-{i:02d}_task-rest_run-1_timeseries.npy"


@pytest.mark.parametrize("what, message", [
    ("overflow", "NaN/Inf values"),                       # finite float64, inf as float32: checked as stored
    ("age500", "age 500 is outside 0-120 years"),
    ("age-3", "age -3 is outside 0-120 years"),
    ("ageinf", "age inf is outside 0-120 years"),
    ("zero_rois", "has 0 ROIs"),
    ("filename", "file name does not match the card's entity_pattern"),
    ("duplicate_row", "duplicate phenotype rows"),
])
def test_implausible_inputs_are_bad_inputs_and_quarantinable(tmp_path, what, message):
    card = make_cohort(tmp_path)
    p = tmp_path / "participants.tsv"
    if what == "overflow":
        ts = _series(2)
        ts[5, 2] = 1e39
        np.save(_npy(tmp_path, 2), ts)
    elif what.startswith("age"):
        p.write_text(p.read_text().replace("sub-02\t22", f"sub-02\t{what[3:]}"))
    elif what == "zero_rois":
        np.save(_npy(tmp_path, 2), np.zeros((N_T, 0)))
        _edit(card, atlas__labels=None, atlas__networks=None)
    elif what == "filename":
        np.save(tmp_path / "derivatives" / "sub-02" / "func" / "scan02_timeseries.npy", _series(2))
        _edit(card, glob="sub-*/func/*timeseries.npy")
    elif what == "duplicate_row":
        p.write_text(p.read_text() + "sub-02\t40\t1\tctl\tL\n")
    with pytest.raises(IngestError) as err:
        ingest_card(card, str(tmp_path / "store"), use_ray=False)
    assert message in str(err.value) and "nothing was committed" in str(err.value)
    assert not (tmp_path / "store" / "toy" / "manifest.json").exists()  # nothing committed
    m = ingest_card(card, str(tmp_path / "store"), quarantine=True, use_ray=False).manifest
    assert len(m["quarantined"]) >= 1 and all(message in q["reason"] for q in m["quarantined"])
    assert table.verify(table.find_datasets(str(tmp_path / "store"))[0][0], m) == []  # what is stored is what was checked


@pytest.mark.parametrize("tr, message", [(float("inf"), "TR inf s is outside"), (1e9, "TR 1000000000.0 s is outside"),
                                         (0.01, "TR 0.01 s is outside")])
def test_implausible_tr_is_refused(tmp_path, tr, message):
    card = make_cohort(tmp_path)
    _edit(card, tr=tr)
    with pytest.raises(IngestError, match=message):
        ingest_card(card, str(tmp_path / "store"), use_ray=False)


def test_transposed_cohort_without_labels_is_refused(tmp_path):
    card = make_cohort(tmp_path)
    _edit(card, arrays__layout="rois_by_time", atlas__labels=None, atlas__networks=None)  # [time, rois] read as [rois, time]
    with pytest.raises(IngestError, match=r"more ROIs \(40\) than timepoints \(5\).*probably transposed"):
        ingest_card(card, str(tmp_path / "store"), use_ray=False)


def test_phenotype_rows_that_match_nothing_are_reported(tmp_path):
    card = make_cohort(tmp_path)
    p = tmp_path / "participants.tsv"
    p.write_text(p.read_text().replace("sub-04\t", "sub-99\t"))
    m = ingest_card(card, str(tmp_path / "store"), use_ray=False).manifest
    r = m["phenotype_report"]
    assert r["matched_subjects"] == 3 and r["unmatched_rows"] == 1 and r["unmatched_examples"] == ["99"]
    assert r["scans_without_row"] == 1
    p.write_text("\n".join(line.replace("sub-", "P") for line in p.read_text().splitlines()) + "\n")  # keyed differently
    _edit(card, phenotypes__subject_column="participant_id")
    with pytest.raises(InputError, match="no row matches any scan's subject"):
        ingest_card(card, str(tmp_path / "store2"), use_ray=False)


def test_reingest_dropping_most_scans_needs_replace(tmp_path):
    card = make_cohort(tmp_path)
    out = str(tmp_path / "store")
    first = ingest_card(card, out, use_ray=False).manifest
    for i in (2, 3, 4):
        _npy(tmp_path, i).unlink()
    with pytest.raises(IngestError, match=r"found 1 good scans where version .* has 4: more than half would be dropped.*--replace"):
        ingest_card(card, out, use_ray=False)
    assert table.read_manifest(table.find_datasets(out)[0][0])["version"] == first["version"]
    assert ingest_card(card, out, use_ray=False, replace=True).manifest["rows"] == 1


def test_reingest_repairs_a_damaged_table(tmp_path, small_synth):
    out = str(tmp_path / "store")
    first = ingest_synthetic(small_synth, out, use_ray=False).manifest
    loc = table.find_datasets(out)[0][0]
    shard = os.path.join(loc.path, first["shards"][0]["path"])
    with open(shard, "r+b") as f:
        f.truncate(100)
    assert table.verify(loc, first)
    again = ingest_synthetic(small_synth, out, use_ray=False)
    assert again.written and again.manifest["version"] != first["version"]
    assert table.verify(loc, table.read_manifest(loc)) == []


def test_stray_files_in_a_dataset_root_are_ignored(tmp_path, small_synth):
    out = tmp_path / "store"
    ingest_synthetic(small_synth, str(out), use_ray=False)
    (out / ".done").write_text("")
    (out / "notes.txt").write_text("hello")
    assert [m["dataset"] for _, m in table.find_datasets(str(out))] == ["tiny"]


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


def test_a_card_split_file_is_frozen_into_the_manifest_and_checked(tmp_path):
    card = make_cohort(tmp_path)
    (tmp_path / "split.csv").write_text("subject_id,split\n01,train\n02,test\n03,train\n")
    _edit(card, split={"method": "file", "file": "split.csv"})
    m = ingest_card(card, str(tmp_path / "store"), use_ray=False).manifest
    assert m["split"]["assignments"] == {"01": "train", "02": "test", "03": "train"}
    assert m["split_report"]["unassigned_scans"] == 1 and m["split_report"]["unassigned_examples"] == ["toy_sub-04_task-rest_run-1"]
    (tmp_path / "split.csv").write_text("subject_id,split\n01,train\n02,tset\n")
    with pytest.raises(InputError, match=r"split name\(s\) \['tset'\] are not one of"):
        ingest_card(card, str(tmp_path / "store2"), use_ray=False)


def test_gc_counts_from_replacement_and_never_takes_a_live_writer_s_version(tmp_path, monkeypatch):
    """`--grace-hours 0.5` deleted a version a job was reading seconds after a re-ingest replaced it
    (its age was counted from its creation); `--grace-hours 0` during an ingest broke the commit."""
    import time

    from fmrilm import storage
    from fmrilm.data import table
    from fmrilm.data.ingest import ingest_synthetic
    from fmrilm.data.synth import SynthParams

    root = str(tmp_path / "ds")
    first = ingest_synthetic(SynthParams(name="c", subjects=4, n_rois=6, n_networks=2, n_timepoints=30, seed=1), root, use_ray=False)
    loc = storage.resolve(root).join("c")
    time.sleep(3.5)  # the first version is 3 s old when a re-ingest replaces it
    second = ingest_synthetic(SynthParams(name="c", subjects=4, n_rois=6, n_networks=2, n_timepoints=30, seed=2), root, use_ray=False)
    assert table.gc(loc, grace_s=2) == []  # replaced just now: a reader may still stream it
    time.sleep(2.5)
    assert table.gc(loc, grace_s=2) == [first.manifest["version"]]
    # a writer at work: its pinned, uncommitted version stays, even at grace 0, until it is gone
    time.sleep(1.1)
    busy = table.new_version()
    storage.write_text(loc.join(busy, "part-00000.parquet"), "x")
    pinned = table.pin(loc, busy)
    assert table.gc(loc, grace_s=0) == []
    table.unpin(pinned)
    assert table.gc(loc, grace_s=0) == [busy]
    # a reader streaming the current version while a re-ingest replaces it: kept while it reads
    third = ingest_synthetic(SynthParams(name="c", subjects=4, n_rois=6, n_networks=2, n_timepoints=30, seed=3), root, use_ray=False)
    with table.reading([(loc, second.manifest)]):
        assert table.gc(loc, grace_s=0) == []
    assert table.gc(loc, grace_s=0) == [second.manifest["version"]]
    assert table.read_manifest(loc)["version"] == third.manifest["version"]


def test_a_full_disk_at_commit_leaves_the_table_as_it_was(tmp_path, monkeypatch):
    """Disk full while the manifest was written: the old manifest stayed but an uncommitted version, a
    .tmp file and a versions/ record stayed too, and the error was a bare [Errno 28]."""
    import errno

    from fmrilm import storage
    from fmrilm.data import table
    from fmrilm.data.ingest import ingest_synthetic
    from fmrilm.data.synth import SynthParams

    root = str(tmp_path / "ds")
    first = ingest_synthetic(SynthParams(name="c", subjects=4, n_rois=6, n_networks=2, n_timepoints=30, seed=1), root, use_ray=False)
    before = snapshot(root)
    real_replace = storage.os.replace

    def full(src, dst):
        if dst.endswith("manifest.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", full)
    with pytest.raises(storage.StorageError, match=r"ingest of 'c' stopped at its commit: nothing was committed \(version "
                                                   r"v-\S+ is unchanged\)\. .*the disk holding it is full"):
        ingest_synthetic(SynthParams(name="c", subjects=4, n_rois=6, n_networks=2, n_timepoints=30, seed=2), root, use_ray=False)
    assert snapshot(root) == before  # no new version, no .tmp, no versions/ record, no pin
    assert table.read_manifest(storage.resolve(root).join("c"))["version"] == first.manifest["version"]


def test_a_damaged_dataset_does_not_stop_a_job_that_reads_another(tmp_path):
    from fmrilm.data import table
    from fmrilm.data.ingest import ingest_synthetic
    from fmrilm.data.pipeline import PipelineSpec, selected_datasets
    from fmrilm.data.synth import SynthParams

    root = tmp_path / "ds"
    for name in ("good", "broken"):
        ingest_synthetic(SynthParams(name=name, subjects=4, n_rois=6, n_networks=2, n_timepoints=30, seed=1), str(root), use_ray=False)
    (root / "broken" / "manifest.json").write_text("{ not json")
    found = selected_datasets(PipelineSpec(root=str(root), datasets=["good"]))
    assert [m["dataset"] for _, m in found] == ["good"]
    with pytest.raises(table.ManifestError, match="broken/manifest.json is not valid JSON"):
        selected_datasets(PipelineSpec(root=str(root)))  # all of them: the damaged one is named
    with pytest.raises(table.ManifestError, match="broken/manifest.json"):
        selected_datasets(PipelineSpec(root=str(root), datasets=["broken"]))


def test_another_cohort_under_an_existing_name_needs_replace(tmp_path):
    """A different cohort ingested under an existing name replaced it silently (only counts were compared)."""
    out = tmp_path / "store"
    ingest_card(make_cohort(tmp_path / "a"), str(out), use_ray=False)
    before = snapshot(out)
    other = make_cohort(tmp_path / "b")
    for d in sorted((tmp_path / "b" / "derivatives").iterdir()):  # the same size, other subjects
        for f in (d / "func").iterdir():
            f.rename(d / "func" / f.name.replace("sub-0", "sub-9"))
        d.rename(d.parent / d.name.replace("sub-0", "sub-9"))
    pheno = tmp_path / "b" / "participants.tsv"
    pheno.write_text(pheno.read_text().replace("sub-0", "sub-9"))
    with pytest.raises(IngestError, match=r"shares 0 of its 4 scan ids with version .*another cohort under the name 'toy'"):
        ingest_card(other, str(out), use_ray=False)
    assert snapshot(out) == before
    assert ingest_card(other, str(out), use_ray=False, replace=True).written
