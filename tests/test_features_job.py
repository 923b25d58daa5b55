"""The features job: tables, training-only z-scores, resume per shard, bad scans, determinism."""

import json
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from fmrilm.data import schema, table
from fmrilm.data.table import NetworkMapMissing
from fmrilm.data.ingest import ingest_synthetic
from fmrilm.data.synth import SynthParams
from fmrilm.features.job import FeaturesError, FeaturesSpec, run

PARAMS = SynthParams(name="feat", subjects=24, n_rois=14, n_networks=4, n_timepoints=120, seed=4)


def _spec(root, datasets=None, **kw):
    return FeaturesSpec(data={"root": str(root), "datasets": datasets}, use_ray=False, plot=False, ica_components=4, **kw)


@pytest.fixture
def cohort(tmp_path):
    ingest_synthetic(PARAMS, str(tmp_path / "ds"), use_ray=False)
    return tmp_path / "ds"


def _tables(root, summary):
    feats = pd.read_parquet(summary["features"])
    caps = pd.read_parquet(summary["captions_table"])
    stats = json.loads(open(os.path.join(os.path.dirname(summary["features"]), "stats.json")).read())
    return feats, caps, stats


def test_tables_and_training_only_zscores(cohort):
    summary = run(_spec(cohort))["feat"]
    assert summary["scans"] == summary["described"] == 24 and summary["failed"] == []
    feats, caps, stats = _tables(cohort, summary)
    assert len(feats) == 24 and len(caps) == 24 * 3
    assert set(caps["scan_id"]) == set(feats["scan_id"])
    train = feats[feats["split"] == "train"]
    held = feats[feats["split"] != "train"]
    assert len(train) and len(held)
    names = [c[2:] for c in feats.columns if c.startswith("z.")]
    assert summary["descriptors"] == len(names) > 50
    for n in names:
        raw_train = train[f"raw.{n}"]
        # statistics come from the training split only: a leak of held-out scans would move these
        assert stats[n]["mean"] == pytest.approx(raw_train.mean(), abs=1e-9)
        assert train[f"z.{n}"].mean() == pytest.approx(0.0, abs=1e-9)
        if stats[n]["sd"] > 0:
            expected = (held[f"raw.{n}"] - raw_train.mean()) / raw_train.std(ddof=1)
            np.testing.assert_allclose(held[f"z.{n}"], expected, atol=1e-9)
    pooled = feats[f"raw.{names[0]}"].mean()
    assert pooled != pytest.approx(stats[names[0]]["mean"], abs=1e-9)  # the check above can fail


def test_deterministic_under_a_seed(tmp_path):
    a = ingest_synthetic(PARAMS, str(tmp_path / "a"), use_ray=False)
    b = ingest_synthetic(PARAMS, str(tmp_path / "b"), use_ray=False)
    fa, ca, _ = _tables(None, run(_spec(tmp_path / "a"))["feat"])
    fb, cb, _ = _tables(None, run(_spec(tmp_path / "b"))["feat"])
    pd.testing.assert_frame_equal(fa, fb)
    pd.testing.assert_frame_equal(ca, cb)
    assert a.manifest["content_sha256"] == b.manifest["content_sha256"]


def test_rerun_is_a_no_op_and_a_lost_part_is_recomputed_alone(cohort):
    first = run(_spec(cohort))["feat"]
    assert run(_spec(cohort))["feat"] == first  # up to date: nothing recomputed
    work = os.path.dirname(first["features"])
    parts = sorted(os.listdir(os.path.join(work, "raw")))
    os.remove(os.path.join(work, "raw", parts[0]))
    os.remove(os.path.join(cohort, "feat", "features", "manifest.json"))  # as if killed before the commit
    again = run(_spec(cohort))["feat"]
    assert again["resumed_shards"] == len(parts) - 1
    pd.testing.assert_frame_equal(pd.read_parquet(again["features"]), pd.read_parquet(first["features"]))


def test_a_constant_roi_scan_gets_a_message_and_the_others_proceed(cohort):
    loc, manifest = table.find_datasets(str(cohort))[0]
    shard = manifest["shards"][0]
    path = os.path.join(loc.path, shard["path"])
    rows = pq.read_table(path).to_pylist()
    bad_id = rows[0]["scan_id"]
    ts = schema.timeseries(rows[0]["timeseries"], rows[0]["n_rois"], rows[0]["n_timepoints"]).copy()
    ts[3] = 5.0
    rows[0]["timeseries"] = ts
    for r in rows[1:]:
        r["timeseries"] = schema.timeseries(r["timeseries"], r["n_rois"], r["n_timepoints"])
    for r in rows:
        r["phenotypes"] = dict(r["phenotypes"] or [])
    pq.write_table(schema.rows_to_table(rows), path)
    summary = run(_spec(cohort))["feat"]
    assert [f["scan_id"] for f in summary["failed"]] == [bad_id]
    assert "ROI(s) 3 are constant over time" in summary["failed"][0]["error"]
    assert summary["described"] == 23
    caps = pd.read_parquet(summary["captions_table"])
    assert bad_id not in set(caps["scan_id"]) and caps["scan_id"].nunique() == 23


def test_dataset_without_network_map_is_refused(tmp_path):
    from fmrilm.data.readers import ScanSource
    from fmrilm.data.ingest import ingest

    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "arr")
    sources = []
    for i in range(3):
        np.save(tmp_path / "arr" / f"{i}.npy", rng.normal(size=(40, 5)))
        sources.append(ScanSource(f"x_sub-{i}", str(i), "x", "atl", "array", str(tmp_path / "arr" / f"{i}.npy"), tr=2.0))
    ingest(sources, str(tmp_path / "ds"), use_ray=False)
    with pytest.raises(NetworkMapMissing, match="no ROI->network map"):
        run(_spec(tmp_path / "ds"))
    with pytest.raises(FeaturesError, match="not found"):
        run(_spec(tmp_path / "ds", datasets=["nope"]))
