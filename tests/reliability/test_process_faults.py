"""Processes dying mid-run: a Ray Train worker SIGKILLed (the stage recovers by itself through
FailureConfig, losing at most one checkpoint interval, and ends where an uninterrupted run ends),
and the driver SIGKILLed (re-running the same spec resumes by run name)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from fmrilm.data.ingest import ingest_synthetic
from fmrilm.data.pipeline import PipelineSpec
from fmrilm.data.synth import SynthParams
from fmrilm.models.tokenizer import TokenizerConfig
from fmrilm.train.optim import OptimSpec
from fmrilm.train.specs import RunSpec, ScalingSpec
from fmrilm.train.tokenizer import TokenizerStageSpec, run

pytestmark = pytest.mark.reliability
CHECKPOINT_EVERY = 4


@pytest.fixture(scope="module")
def stage_data(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    ingest_synthetic(SynthParams(name="faults", subjects=16, n_rois=12, n_networks=4, n_timepoints=64, seed=4), str(root / "datasets"))
    return root


def _spec(root, name: str, epochs: int = 4, **run) -> TokenizerStageSpec:
    return TokenizerStageSpec(
        data=PipelineSpec(root=str(root / "datasets"), window=32, stride=32, split={"fractions": {"train": 0.75, "val": 0.25}}),
        model=TokenizerConfig(patch=16, width=16, heads=2, depth=1, code_dim=8, num_codes=32),
        train=OptimSpec(epochs=epochs, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=CHECKPOINT_EVERY, log_every=2),
        scaling=ScalingSpec(num_workers=2, cpus_per_worker=0.5),
        run=RunSpec(storage=str(root / "runs"), name=name, logger="none", **run),
    )


def test_killed_worker_recovers_within_one_checkpoint_interval(stage_data, monkeypatch):
    reference = run(_spec(stage_data, "uninterrupted"))["metrics"]
    kill_step = 10
    monkeypatch.setenv("FMRILM_FAULT_STEP", f"kill:{kill_step}")  # SIGKILL of the last rank at step 10
    result = run(_spec(stage_data, "worker-killed", max_failures=1))
    m = result["metrics"]
    # the worker group was restarted inside the same fit() and resumed from the newest checkpoint
    assert kill_step - CHECKPOINT_EVERY <= m["resumed_from_step"] <= kill_step
    assert m["step"] == reference["step"] == 12  # 24 train windows / (4 x 2 ranks) x 4 epochs
    # the same run, up to data order across the restart: final held-out metrics agree
    assert m["val/r2"] == pytest.approx(reference["val/r2"], abs=0.1)
    assert m["val/mse"] == pytest.approx(reference["val/mse"], rel=0.15)
    assert os.path.exists(result["artifact"].removeprefix("file://"))


def _free_cpus(ray) -> float:
    return ray.available_resources().get("CPU", 0.0)


def test_killed_driver_then_the_same_spec_resumes_by_run_name(stage_data, ray_cluster, tmp_path):
    spec = _spec(stage_data, "driver-killed", epochs=8)  # 24 steps
    spec_file = tmp_path / "tokenizer.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    cpus = _free_cpus(ray_cluster)  # what this test's driver may use (other tests' actors may hold some)
    env = os.environ | {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}  # a second driver on this cluster
    driver = subprocess.Popen([sys.executable, "-m", "fmrilm", "run", str(spec_file)], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = stage_data / "runs" / "driver-killed"
    first = run_dir / "checkpoint_0000008"
    deadline = time.monotonic() + 180
    try:
        while not first.exists():
            assert driver.poll() is None, f"the driver exited ({driver.returncode}) before its second checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.05)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    # Ray ends a dead driver's job: its controller and workers go and their CPUs come back
    deadline = time.monotonic() + 60
    while _free_cpus(ray_cluster) < cpus:
        assert time.monotonic() < deadline, f"the killed driver's workers still hold CPUs ({_free_cpus(ray_cluster)}/{cpus})"
        time.sleep(0.5)
    written = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_0"))
    assert written[-1] < "checkpoint_0000024"  # it really was stopped part-way
    m = run(spec)["metrics"]
    assert int(written[-1].split("_")[1]) - CHECKPOINT_EVERY <= m["resumed_from_step"] <= int(written[-1].split("_")[1])
    assert m["step"] == 24
