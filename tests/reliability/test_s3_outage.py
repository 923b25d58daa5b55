"""The object store going away mid-run. The local S3 server is reached through a relay that stops
at an exact request (a shard upload during ingestion, a checkpoint upload during training):
bounded retries, then a clear error that says what was kept; nothing committed is lost; after the
server is back, re-running the same thing completes with nothing lost or duplicated. The training
run has fake credentials in its environment: none of them may appear in anything it wrote."""

import os
import time

import pyarrow.fs as pafs
import pytest

from fmrilm import storage
from fmrilm.data import table
from fmrilm.data.ingest import ingest_synthetic
from fmrilm.data.pipeline import PipelineSpec
from fmrilm.data.synth import SynthParams
from fmrilm.models.tokenizer import TokenizerConfig
from fmrilm.train.optim import OptimSpec
from fmrilm.train.specs import RunSpec, ScalingSpec
from fmrilm.train.tokenizer import TokenizerStageSpec, run

from tests.credentials import fake_aws_credentials
from tests.reliability.outage import OutageProxy

pytestmark = pytest.mark.reliability
FAKE = fake_aws_credentials()
BOUND_S = 90  # bounded retries: a failure is reported within this, never a hang


@pytest.fixture(scope="module")
def proxy(local_s3, ray_cluster):
    """The relay in front of the session's moto server; this process and the tasks it starts
    reach S3 through it (for this module)."""
    relay = OutageProxy(local_s3.endpoint).up()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", relay.endpoint)
        yield relay
    relay.down()


def _versions(uri: str) -> list[str]:
    return [n for n in storage.list_dir(storage.resolve(uri)) if n.startswith("v-")]


def test_outage_during_ingestion_keeps_the_committed_table_and_a_rerun_completes(proxy, local_s3):
    root = local_s3.uri("outage-ingest", "datasets")
    first = ingest_synthetic(SynthParams(name="cohort", subjects=16, n_rois=8, n_networks=2, n_timepoints=48, seed=1), root).manifest
    changed = SynthParams(name="cohort", subjects=24, n_rois=8, n_networks=2, n_timepoints=48, seed=2)
    proxy.down_at(r"^PUT /fmrilm-test/outage-ingest/datasets/cohort/v-[^/]+/part-", nth=2)  # the 2nd shard upload
    start = time.monotonic()
    with pytest.raises(storage.StorageError) as err:
        ingest_synthetic(changed, root)
    assert time.monotonic() - start < BOUND_S and proxy.stopped_at is not None
    message = str(err.value)
    assert "ingest of 'cohort' stopped: nothing was committed" in message
    assert f"version {first['version']} is unchanged" in message and "Re-run the same command once the store is reachable" in message
    assert proxy.endpoint.removeprefix("http://") in message  # names the unreachable endpoint

    proxy.up()
    loc, manifest = table.find_datasets(root)[0]
    assert manifest == first and table.verify(loc, manifest) == []  # nothing committed was lost
    result = ingest_synthetic(changed, root)  # the same command again
    loc, manifest = table.find_datasets(root)[0]
    assert result.written and manifest["version"] != first["version"]
    assert manifest["rows"] == 24 == sum(s["rows"] for s in manifest["shards"])
    ids = table.read_meta(loc, manifest).column("scan_id").to_pylist()
    assert len(ids) == len(set(ids)) == 24  # nothing lost, nothing duplicated
    assert table.verify(loc, manifest) == []
    assert first["version"] in _versions(root + "/cohort")  # commits delete nothing: a reader may still stream it
    table.gc(loc, grace_s=0)  # `fmrilm data gc`: the superseded and the partly written version folders go
    assert _versions(root + "/cohort") == [manifest["version"]]


def _tokenizer_spec(data: str, runs: str) -> TokenizerStageSpec:
    return TokenizerStageSpec(
        data=PipelineSpec(root=data, window=32, stride=32, split={"fractions": {"train": 0.75, "val": 0.25}}),
        model=TokenizerConfig(patch=16, width=16, heads=2, depth=1, code_dim=8, num_codes=32),
        train=OptimSpec(epochs=4, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=4, log_every=2),
        scaling=ScalingSpec(num_workers=2, cpus_per_worker=0.5),
        run=RunSpec(storage=runs, name="outage", logger="tensorboard"),
    )


@pytest.fixture(scope="module")
def interrupted_training(proxy, local_s3, tmp_path_factory):
    """A tokenizer run on S3 whose store goes down at its second checkpoint upload, then the
    same run again once the store is back. Fake credentials are in the environment throughout."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in FAKE.items():
            mp.setenv(k, v)
        yield _interrupt_and_rerun(proxy, local_s3, tmp_path_factory.mktemp("outage-train"))


def _interrupt_and_rerun(proxy, local_s3, tmp_path) -> dict:
    data, runs = local_s3.uri("outage-train", "datasets"), local_s3.uri("outage-train", "runs")
    ingest_synthetic(SynthParams(name="train", subjects=16, n_rois=12, n_networks=4, n_timepoints=64, seed=4), data)
    spec = _tokenizer_spec(data, runs).model_copy(deep=True)
    spec.run.log_dir = str(tmp_path / "tensorboard")
    proxy.down_at(r"^PUT /fmrilm-test/outage-train/runs/outage/checkpoint_0000008/")
    start = time.monotonic()
    with pytest.raises(storage.StorageError) as err:
        run(spec)
    failed_after = time.monotonic() - start
    proxy.up()
    result = run(spec)
    return {"error": str(err.value), "failed_after": failed_after, "result": result, "runs": runs, "tb": tmp_path / "tensorboard"}


def test_outage_during_training_fails_clearly_and_the_rerun_resumes(interrupted_training, proxy):
    t = interrupted_training
    assert proxy.stopped_at.startswith("PUT /fmrilm-test/outage-train/runs/outage/checkpoint_0000008/")
    assert "run 'outage' stopped: its storage" in t["error"] and "is unreachable" in t["error"]
    assert "Checkpoints registered before the outage are kept" in t["error"] and "re-run the same command" in t["error"]
    assert t["failed_after"] < BOUND_S + 60  # includes starting the workers
    m = t["result"]["metrics"]
    assert m["resumed_from_step"] == 4 and m["step"] == 12  # lost only the interval after checkpoint 4
    run_dir = storage.resolve(t["runs"]).join("outage")
    names = storage.list_dir(run_dir)
    assert "tokenizer" in names and [n for n in names if n.startswith("checkpoint_0")] == ["checkpoint_0000008", "checkpoint_0000012"]
    assert storage.exists(run_dir.join("checkpoint_0000012", "state.pt"))


def _all_files(loc: storage.Location):
    for info in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True)):
        if info.type == pafs.FileType.File:
            yield info.path, storage.read_bytes(storage.Location(loc.fs, info.path, info.path))


def test_no_credentials_in_anything_the_run_wrote(interrupted_training):
    t = interrupted_training
    secrets = [v.encode() for v in FAKE.values()]
    checked = 0
    for path, data in _all_files(storage.resolve(t["runs"])):  # specs, checkpoints, artifact, snapshots
        assert not any(s in data for s in secrets), f"a credential in {path}"
        checked += 1
    for dirpath, _, files in os.walk(t["tb"]):  # TensorBoard logs
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                assert not any(s in f.read() for s in secrets), f"a credential in {name}"
            checked += 1
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    for dirpath, _, files in os.walk(os.path.join(session, "logs")):  # driver, worker and runtime_env logs
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                assert not any(s in f.read() for s in secrets), f"a credential in Ray log {name}"
    assert checked > 5
    assert not any(s.decode() in str(t["result"]) for s in secrets)
