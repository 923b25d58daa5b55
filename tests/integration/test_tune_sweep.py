"""A Ray Tune sweep of a tiny tokenizer (Train V2 pattern) on the local cluster: 4 trials over two
codebook sizes and two learning rates, ASHA stops at least one early, the table has every trial,
the best spec loads as a stage spec; a bad search space fails before any trial starts; a sweep whose
driver is killed part-way resumes when the same spec runs again, keeping its finished trials."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from fmrilm import config
from fmrilm.config import ConfigError
from fmrilm.data.ingest import ingest_synthetic
from fmrilm.data.synth import SynthParams
from fmrilm.tune.sweep import SweepSpec, run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def base(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    data = str(root / "datasets")
    ingest_synthetic(SynthParams(name="sweep", subjects=16, n_rois=8, n_networks=4, n_timepoints=96, seed=2), data)
    spec = {"kind": "tokenizer", "data": {"root": data, "window": 32, "stride": 32},
            "model": {"patch": 16, "width": 16, "heads": 2, "depth": 1, "code_dim": 8, "num_codes": 16},
            "alignment": {"domain_weight": 0.0},
            "train": {"epochs": 2, "batch_size": 8, "checkpoint_every": 2, "warmup_steps": 1},
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.5}, "run": {"storage": str(root / "runs"), "name": "tok", "logger": "none"}}
    path = root / "tokenizer.yaml"
    path.write_text(yaml.safe_dump(spec))
    return {"root": root, "base": str(path)}


def _sweep(base, name, **extra):
    return config.build(SweepSpec, {"stage": "tokenizer", "base": base["base"], "run": {"name": name, "storage": str(base["root"] / "runs")},
                                    "space": {"model.num_codes": {"grid": [8, 32]}, "train.lr": {"grid": [3e-3, 1e-6]}},
                                    "metric": "val/r2", "mode": "max", "max_concurrent_trials": 2} | extra)


def test_sweep_asha_table_and_best_spec(base):
    result = run(_sweep(base, "sw"))
    table = result["table"]
    assert len(table) == 4 and set(table["model.num_codes"]) == {8, 32} and table["error"].isna().all()
    assert result["stopped_early"] >= 1 and table["stopped_early"].sum() == result["stopped_early"]
    assert pd.read_parquet(result["files"]["results.parquet"]).shape[0] == 4
    best = table.loc[table["val/r2"].idxmax()]
    from fmrilm.registry import job_for

    data = config.load_yaml(result["best"])
    assert data["model"]["num_codes"] == best["model.num_codes"] and data["train"]["lr"] == best["train.lr"]
    spec_model, _ = job_for(data["kind"])
    spec = config.build(spec_model, data, result["best"])  # a spec the stage runs as it is (the stage runs are tested elsewhere)
    assert spec.run.name == "sw-best" and spec.alignment.domain_weight == 0.0  # its own run: it never resumes a trial


def test_bad_search_space_fails_before_any_trial(base):
    with pytest.raises(ConfigError, match="model.codez: unknown key"):
        run(_sweep(base, "bad", space={"model.codez": {"grid": [8]}}))
    with pytest.raises(ConfigError, match="empty grid"):
        _sweep(base, "bad", space={"model.num_codes": {"grid": []}})
    assert not (base["root"] / "runs" / "bad").exists()


def test_a_sweep_whose_every_trial_fails_says_so(base, monkeypatch):
    from fmrilm.tune.sweep import SweepFailed

    monkeypatch.setenv("FMRILM_FAULT_STEP", "1")  # forwarded to the trials: each one fails at its first step
    with pytest.raises(SweepFailed, match="every trial of sweep failing failed; the first: .*injected fault at step 1"):
        run(_sweep(base, "failing", space={"model.num_codes": {"grid": [8]}}, overrides=["train.epochs=1"]))
    assert (base["root"] / "runs" / "failing" / "results.md").exists()  # the table is written first


def _finished_trials(trials_dir) -> dict[str, int]:
    """Trial run name -> the step of its exported tokenizer (written when its stage run finished)."""
    out = {}
    for name in os.listdir(trials_dir) if os.path.isdir(trials_dir) else []:
        done = os.path.join(trials_dir, name, "tokenizer", "config.json")
        if os.path.exists(done):
            out[name] = json.load(open(done))["step"]
    return out


def test_killed_sweep_driver_then_the_same_spec_resumes(base, ray_cluster):
    spec = _sweep(base, "resumed", scheduler="fifo", max_concurrent_trials=1, space={"model.num_codes": {"grid": [8, 32]}},
                  overrides=["train.epochs=1"])
    path = base["root"] / "resumed.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    trials_dir = base["root"] / "runs" / "resumed" / "trials"
    env = os.environ | {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    free = ray_cluster.available_resources().get("CPU", 0)
    driver = subprocess.Popen([sys.executable, "-m", "fmrilm", "tune", str(path)], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while not _finished_trials(trials_dir):
            assert driver.poll() is None, f"the sweep driver exited ({driver.returncode}) before a trial finished"
            assert time.monotonic() < deadline, "no trial finished within 300 s"
            time.sleep(0.2)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    before = _finished_trials(trials_dir)
    assert len(before) == 1
    deadline = time.monotonic() + 60  # the killed driver's trials and their workers go with it
    while ray_cluster.available_resources().get("CPU", 0) < free:
        assert time.monotonic() < deadline, "the killed sweep still holds CPUs"
        time.sleep(0.5)
    result = run(spec)  # the same spec: restores the sweep
    table = result["table"]
    assert len(table) == 2 and table["error"].isna().all()
    after = _finished_trials(trials_dir)
    assert len(after) == 2 and all(after[t] == n for t, n in before.items())  # the finished trial was not trained further
