"""Beyond one node: a head and two worker nodes on 127.0.0.1 (:class:`fmrilm.local_cluster.LocalCluster`:
each node its own logical CPUs and label resource, token auth on), the local S3 server as the
only shared store, every path on s3://. `fmrilm submit` runs spread one worker per node (checked
from Ray's state API): the tokenizer, LM pretraining with DeepSpeed ZeRO-2 and ZeRO-3 (the same
steps and loss as the same spec on one node), a sweep's trials. A worker node killed mid-run
(raylet and every process on it, SIGKILL) costs at most one checkpoint interval: the run goes on
from the newest checkpoint on S3 on the nodes left, ends at the same final step, and `fmrilm
logs` says a node was lost and the run resumed. The head lost: `fmrilm status` says the cluster
is gone, and the same spec submitted to a new cluster resumes from S3."""

import json
import os
import secrets
import subprocess
import sys
import time

import pytest

from fmrilm import storage, submit
from fmrilm.local_cluster import LocalCluster

from tests.ray_head import head_env

pytestmark = pytest.mark.integration
TINY = ["model.num_codes=16", "model.width=16", "model.depth=1", "model.heads=2", "model.code_dim=8", "run.logger=none"]


@pytest.fixture(scope="module", autouse=True)
def _no_other_ray_here():
    """The suite's in-process Ray is stopped while this module's cluster runs, and started again
    after: beside it, jobs on the loopback nodes failed to download their runtime env packages
    from the head ("prematurely deleted from the GCS")."""
    import ray

    running = ray.is_initialized()
    if running:
        ray.shutdown()
    yield
    if running:
        from tests.conftest import start_local_ray

        start_local_ray()


@pytest.fixture(scope="module")
def cohort(local_s3):
    """A small synthetic cohort on the local S3 server, written without Ray."""
    from fmrilm.data.ingest import ingest_synthetic
    from fmrilm.data.synth import SynthParams

    root = local_s3.uri("multinode", "datasets")
    ingest_synthetic(SynthParams(name="synthetic", subjects=24, n_rois=8, n_networks=4, n_timepoints=128, seed=4), root, use_ray=False)
    return root


@pytest.fixture(scope="module")
def cluster(local_s3, monkeypatch_module):
    """Head (2 CPUs) + node1 + node2 (1 CPU each), token auth on. Every command that talks to it
    runs in a fresh process (:func:`_fmrilm`): Ray reads its auth mode and token once per process,
    and this one holds the suite's own Ray without auth."""
    token = secrets.token_hex(32)
    monkeypatch_module.setenv("RAY_AUTH_MODE", "token")
    monkeypatch_module.setenv("RAY_AUTH_TOKEN", token)
    with LocalCluster(workers=2, head_cpus=2, worker_cpus=1, env=_cluster_env(token)) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _cluster_env(token: str) -> dict:
    return head_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="180")


def _fmrilm(*args, timeout_s: float = 180) -> tuple[int, str]:
    """``fmrilm ARGS`` in a fresh process with this environment (the cluster's token); exit code and output."""
    r = subprocess.run([sys.executable, "-m", "fmrilm", *args], env=dict(os.environ), capture_output=True, text=True, timeout=timeout_s)
    return r.returncode, r.stdout + r.stderr


def _api(address: str, path: str, **params) -> dict | list:
    """GET ``path`` of the cluster's dashboard with the cluster's token, in this process: the
    polls below run every second or two, and a fresh ``fmrilm`` process per poll (importing Ray)
    took CPU from the jobs it watched."""
    import urllib.parse
    import urllib.request

    query = "?" + urllib.parse.urlencode(params, doseq=True) if params else ""
    req = urllib.request.Request(f"{address}{path}{query}", headers={"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _job(name: str, address: str) -> dict:
    """Ray's record of the submission ``name`` (its status, job_id), or {} while there is none."""
    import urllib.error

    try:
        return _api(address, f"/api/jobs/{name}")
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return {}
        raise


def _wait(name: str, address: str, timeout_s: float = 400) -> str:
    """Poll the job table until run ``name`` ends; its status."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = _job(name, address).get("status")
        if status in submit.TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(2)


def _logs(name: str, address: str) -> str:
    return _fmrilm("logs", name, "--address", address)[1]


def _workers(address: str, job_id: str, alive_only: bool = False) -> list[dict]:
    """The Ray Train worker actors of one job (Ray's state API over HTTP)."""
    keys, values = ["job_id"] + (["state"] if alive_only else []), [job_id] + (["ALIVE"] if alive_only else [])
    out = _api(address, "/api/v0/actors", detail="true", limit=1000, filter_keys=keys, filter_predicates=["="] * len(keys),
               filter_values=values)
    assert out["result"], out
    return [{"actor_id": a["actor_id"], "node_id": a["node_id"]} for a in out["data"]["result"]["result"] if "TrainWorker" in a["class_name"]]


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_cluster_requires_its_token(cluster):
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{cluster.dashboard}/api/jobs/", data=json.dumps({"entrypoint": "true"}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code in (401, 403)


def _final_metrics(log: str) -> dict:
    """The final step and figures from a run's summary line: the loss (last log interval) and,
    where the run had validation subjects, the validation loss of an LM run; the validation R^2
    and FC preservation of a tokenizer run."""
    import re

    line = [ln for ln in log.splitlines() if re.search(r"\(step \d+\)$", ln)]
    assert line, log[-3000:]
    found = dict(re.findall(r"(?:^|, )(loss|val/loss|val/r2|val/fc_preservation) (-?[0-9.]+)", line[-1]))
    return {"step": int(re.search(r"\(step (\d+)\)$", line[-1]).group(1))} | {k: float(v) for k, v in found.items()}


def _submit_and_wait(cluster, name: str, *args, timeout_s: float = 400) -> str:
    """Submit ``args`` as run ``name``, wait for it; its log (it must have succeeded)."""
    code, out = _fmrilm("submit", *args, "--address", cluster.dashboard)
    assert code == 0, out
    status = _wait(name, cluster.dashboard, timeout_s)
    log = _logs(name, cluster.dashboard)
    assert status == "SUCCEEDED", log[-4000:]
    return log


TOKENIZER = [*TINY, "train.epochs=20", "train.max_steps=8", "train.checkpoint_every=2", "train.batch_size=8", "scaling.num_workers=2",
             "scaling.cpus_per_worker=1"]


@pytest.fixture(scope="module")
def one_node_tokenizer(cohort, cluster, local_s3):
    """The node-loss test's tokenizer spec packed on one node (no fault): its artifact and tokens
    table on S3 (each made by a submitted job) for the LM runs, and its final figures."""
    runs = local_s3.uri("multinode", "runs")
    log = _submit_and_wait(cluster, "tok-one-node", "jobs/tokenizer.yaml", f"data.root={cohort}", f"run.storage={runs}",
                           "run.name=tok-one-node", *TOKENIZER, "scaling.placement=pack")
    job = _job("tok-one-node", cluster.dashboard)["job_id"]
    assert len({a["node_id"] for a in _workers(cluster.dashboard, job)}) == 1
    art = storage.join(runs, "tok-one-node", "tokenizer")
    _submit_and_wait(cluster, "tokenize", "jobs/tokenize.yaml", f"tokenizer={art}", f"data.root={cohort}", "probes=false")
    return {"artifact": art, "final": _final_metrics(log)}


@pytest.mark.parametrize("zero,workers", [(2, 3), (3, 2)])
def test_lm_pretraining_spreads_over_nodes_with_deepspeed(one_node_tokenizer, cohort, cluster, local_s3, zero, workers):
    """ZeRO-2 on three workers and ZeRO-3 on two, one worker per node, finish every step and
    export; the ZeRO-3 run against the same spec packed on one node: the same steps, the final
    loss (and the validation loss, where the split has validation subjects) within 2 %."""
    name = f"lm-z{zero}-nodes"
    common = ["jobs/pretrain.yaml", f"tokenizer={one_node_tokenizer['artifact']}", f"data.root={cohort}", f"run.storage={local_s3.uri('multinode', 'runs')}",
              "backbone.tiny_width=32", "seq_len=64", f"deepspeed.zero_stage={zero}", "deepspeed.micro_batch_size=2",
              "train.epochs=2", "train.checkpoint_every=4", f"scaling.num_workers={workers}", "scaling.cpus_per_worker=1"]
    log = _submit_and_wait(cluster, name, *common, f"run.name={name}", "scaling.placement=spread")
    job = _job(name, cluster.dashboard)["job_id"]
    assert len({a["node_id"] for a in _workers(cluster.dashboard, job)}) == workers  # one worker per node
    spread = _final_metrics(log)
    assert spread["step"] > 0 and "model: s3://" in log
    if zero == 3:
        one = f"lm-z{zero}-one-node"
        packed = _final_metrics(_submit_and_wait(cluster, one, *common, f"run.name={one}", "scaling.placement=pack"))
        assert len({a["node_id"] for a in _workers(cluster.dashboard, _job(one, cluster.dashboard)["job_id"])}) == 1
        assert packed["step"] == spread["step"] and packed.keys() == spread.keys()
        for key in set(packed) - {"step"}:
            assert abs(packed[key] - spread[key]) <= 0.02 * packed[key], (packed, spread)


def test_a_sweep_s_trials_land_on_more_than_one_node(cohort, cluster, local_s3):
    """Two tokenizer trials whose workers take a whole CPU each: they run side by side on different nodes."""
    overrides = ",".join([f"data.root={cohort}", *TINY, "train.epochs=1", "train.max_steps=2", "train.batch_size=8",
                          "scaling.num_workers=1", "scaling.cpus_per_worker=1"])
    _submit_and_wait(cluster, "sweep-nodes", "jobs/sweep_tokenizer.yaml", f"overrides=[{overrides}]", "space={model.num_codes: {grid: [8, 16]}}",
                     "scheduler=fifo", f"run.storage={local_s3.uri('multinode', 'sweeps')}", "run.name=sweep-nodes")
    workers = _workers(cluster.dashboard, _job("sweep-nodes", cluster.dashboard)["job_id"])
    assert len(workers) == 2 and len({a["node_id"] for a in workers}) == 2, [cluster.name_of(a["node_id"]) for a in workers]


def test_tokenizer_spreads_over_nodes_and_survives_losing_one(one_node_tokenizer, cohort, cluster, local_s3, monkeypatch):
    """Spread one worker per node, a worker node killed at step 4: resumed at 4 on the nodes left,
    ends at step 8 like the same spec packed on one node, with its validation R^2 within 0.05. FC
    preservation after 8 steps on the cohort's few validation subjects moves with the order of the
    windows (Ray Data's split over the workers is not fixed; measured 0.61 and 0.44 spread vs 0.48 packed):
    it is only held within 0.2."""
    runs = local_s3.uri("multinode", "runs")
    monkeypatch.setenv("FMRILM_FAULT_STEP", "hold:4")  # every worker waits at step 4 (after its checkpoint) for the kill
    monkeypatch.setenv("FMRILM_FAULT_HOLD_S", "90")
    code, out = _fmrilm("submit", "jobs/tokenizer.yaml", f"data.root={cohort}", f"run.storage={runs}", "run.name=tok-nodes", *TOKENIZER,
                        "scaling.placement=spread", "run.max_failures=2", "submit.env=[FMRILM_FAULT_STEP,FMRILM_FAULT_HOLD_S]",
                        "--address", cluster.dashboard)
    assert code == 0, out
    job_id = _wait_for(lambda: _job("tok-nodes", cluster.dashboard).get("job_id"), 120, "the job to start")

    # placement, from Ray's state API: the two workers on two different nodes
    first = _wait_for(lambda: (w := _workers(cluster.dashboard, job_id, alive_only=True)) and len(w) == 2 and w, 240, "two workers")
    placed = {a["node_id"] for a in first}
    assert len(placed) == 2, [cluster.name_of(n) for n in placed]

    # a node lost while every worker holds at step 4, after checkpoint 4 reached S3
    ckpt = storage.join(runs, "tok-nodes", "checkpoint_0000004", "meta.json")
    _wait_for(lambda: storage.exists(storage.resolve(ckpt)), 240, "checkpoint 4 on S3")
    time.sleep(2)  # the controller registers a checkpoint when it next polls the workers
    victim = next(cluster.name_of(n) for n in placed if cluster.name_of(n) != "head")
    cluster.kill(victim)

    assert _wait("tok-nodes", cluster.dashboard) == "SUCCEEDED", _logs("tok-nodes", cluster.dashboard)[-4000:]
    log = _logs("tok-nodes", cluster.dashboard)
    assert "resumed at step 4" in log and "lost 1 node(s)" in log, log[-4000:]
    spread, packed = _final_metrics(log), one_node_tokenizer["final"]
    print("tokenizer, spread with a node lost:", spread, "packed on one node:", packed)
    assert spread["step"] == packed["step"] == 8 and spread.keys() == packed.keys() >= {"val/r2", "val/fc_preservation"}, (spread, packed)
    assert abs(spread["val/r2"] - packed["val/r2"]) <= 0.05 and abs(spread["val/fc_preservation"] - packed["val/fc_preservation"]) <= 0.2, (
        spread, packed)
    folders = storage.list_dir(storage.resolve(storage.join(runs, "tok-nodes")))
    assert "checkpoint_0000008" in folders and not any("-after-" in f for f in folders), folders  # same final step, no fall-back
    again = [a for a in _workers(cluster.dashboard, job_id) if a["actor_id"] not in {f["actor_id"] for f in first}]
    assert len(again) == 2 and cluster.node_ids[victim] not in {a["node_id"] for a in again}  # restarted on the nodes left
    assert len({a["node_id"] for a in again}) == 2  # still one worker per node
    code, out = _fmrilm("status", "tok-nodes", "--address", cluster.dashboard, "--json")
    assert code == 0 and '"SUCCEEDED"' in out and "lost 1 node(s)" in out and "resumed at step 4" in out, out


def test_losing_the_head_ends_the_job_and_the_same_spec_resumes_on_a_new_cluster(cohort, cluster, local_s3, monkeypatch):
    """Last in this module: it kills the module's cluster."""
    import os

    runs = local_s3.uri("multinode", "runs")
    spec = ["jobs/tokenizer.yaml", f"data.root={cohort}", f"run.storage={runs}", "run.name=tok-head", *TOKENIZER, "scaling.placement=spread"]
    monkeypatch.setenv("FMRILM_FAULT_STEP", "hold:4")
    code, out = _fmrilm("submit", *spec, "submit.env=[FMRILM_FAULT_STEP]", "--address", cluster.dashboard)
    assert code == 0, out
    _wait_for(lambda: storage.exists(storage.resolve(storage.join(runs, "tok-head", "checkpoint_0000004", "meta.json"))), 240,
              "checkpoint 4 on S3")
    time.sleep(2)
    cluster.kill("head")
    code, out = _fmrilm("status", "tok-head", "--address", cluster.dashboard)
    assert code == 2 and "cannot reach the Ray dashboard" in out and "Traceback" not in out, out

    monkeypatch.delenv("FMRILM_FAULT_STEP")
    with LocalCluster(workers=1, head_cpus=2, worker_cpus=1, env=_cluster_env(os.environ["RAY_AUTH_TOKEN"])) as second:
        log = _submit_and_wait(second, "tok-head", *spec)
    assert "resumed at step 4" in log, log[-3000:]
    assert "checkpoint_0000008" in storage.list_dir(storage.resolve(storage.join(runs, "tok-head")))
