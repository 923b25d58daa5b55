"""Beyond one node: a head and two worker nodes on 127.0.0.1 (tests/ray_cluster.py: each node its
own logical CPUs and label resource, token auth on), the local S3 server as the only shared store,
every path on s3://. `fmrilm submit` runs spread one worker per node (checked from Ray's state
API), and a node killed mid-run (raylet and workers, SIGKILL) costs at most one checkpoint
interval: the run goes on from the newest checkpoint on S3 on the nodes left, ends at the same
final step, and `fmrilm logs` says a node was lost and the run resumed."""

import secrets
import time

import pytest
from typer.testing import CliRunner

from fmrilm import storage, submit
from fmrilm.cli import app

from tests.ray_cluster import ray_nodes
from tests.ray_head import head_env

pytestmark = pytest.mark.integration
TINY = ["model.num_codes=16", "model.width=16", "model.depth=1", "model.heads=2", "model.code_dim=8", "run.logger=none"]


@pytest.fixture(scope="module")
def cohort(local_s3):
    """A small synthetic cohort on the local S3 server, written without Ray."""
    from fmrilm.data.ingest import ingest_synthetic
    from fmrilm.data.synth import SynthParams

    root = local_s3.uri("multinode", "datasets")
    ingest_synthetic(SynthParams(name="synthetic", subjects=16, n_rois=8, n_networks=4, n_timepoints=128, seed=4), root, use_ray=False)
    return root


@pytest.fixture(scope="module")
def cluster(local_s3, monkeypatch_module):
    """Head (2 CPUs) + node1 + node2 (1 CPU each), token auth on; this process holds the token."""
    token = secrets.token_hex(32)
    monkeypatch_module.setenv("RAY_AUTH_MODE", "token")
    monkeypatch_module.setenv("RAY_AUTH_TOKEN", token)
    env = head_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="180")
    with ray_nodes(env, workers=2, head_cpus=2, worker_cpus=1) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _cli(*args):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _workers(address: str, job_id: str, alive_only: bool = False) -> list:
    """The Ray Train worker actors of one job (state API), oldest first."""
    from ray.util.state import list_actors

    filters = [("job_id", "=", job_id)] + ([("state", "=", "ALIVE")] if alive_only else [])
    actors = list_actors(address=address, filters=filters, detail=True, limit=1000)
    return [a for a in actors if "TrainWorker" in a.class_name]


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


def test_tokenizer_spreads_over_nodes_and_survives_losing_one(cohort, cluster, local_s3, monkeypatch):
    runs = local_s3.uri("multinode", "runs")
    monkeypatch.setenv("FMRILM_FAULT_STEP", "hold:4")  # every worker waits at step 4 (after its checkpoint) for the kill
    monkeypatch.setenv("FMRILM_FAULT_HOLD_S", "90")
    code, out = _cli("submit", "jobs/tokenizer.yaml", f"data.data={cohort}", f"run.storage={runs}", "run.name=tok-nodes", *TINY,
                     "train.epochs=20", "train.max_steps=8", "train.checkpoint_every=2", "train.batch_size=8",
                     "scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.placement=spread", "run.max_failures=2",
                     "submit.env=[FMRILM_FAULT_STEP,FMRILM_FAULT_HOLD_S]", "--address", cluster.dashboard)
    assert code == 0, out
    job_id = _wait_for(lambda: submit.job_info("tok-nodes", cluster.dashboard).job_id, 120, "the job to start")

    # placement, from Ray's state API: the two workers on two different nodes
    first = _wait_for(lambda: (w := _workers(cluster.dashboard, job_id, alive_only=True)) and len(w) == 2 and w, 240, "two workers")
    placed = {a.node_id for a in first}
    assert len(placed) == 2, [cluster.name_of(n) for n in placed]

    # a node lost while every worker holds at step 4, after checkpoint 4 reached S3
    ckpt = storage.join(runs, "tok-nodes", "checkpoint_0000004", "meta.json")
    _wait_for(lambda: storage.exists(storage.resolve(ckpt)), 240, "checkpoint 4 on S3")
    time.sleep(2)  # the controller registers a checkpoint when it next polls the workers
    victim = next(cluster.name_of(n) for n in placed if cluster.name_of(n) != "head")
    cluster.kill(victim)

    assert submit.wait("tok-nodes", cluster.dashboard, 400) == "SUCCEEDED", submit.logs("tok-nodes", cluster.dashboard)[-4000:]
    log = submit.logs("tok-nodes", cluster.dashboard)
    assert "resumed at step 4" in log and "lost 1 node(s)" in log, log[-4000:]
    folders = storage.list_dir(storage.resolve(storage.join(runs, "tok-nodes")))
    assert "checkpoint_0000008" in folders and not any("-after-" in f for f in folders), folders  # same final step, no fall-back
    again = [a for a in _workers(cluster.dashboard, job_id) if a.actor_id not in {f.actor_id for f in first}]
    assert len(again) == 2 and cluster.node_ids[victim] not in {a.node_id for a in again}  # restarted on the nodes left
    assert len({a.node_id for a in again}) == 2  # still one worker per node
    code, out = _cli("status", "tok-nodes", "--address", cluster.dashboard, "--json")
    assert code == 0 and '"SUCCEEDED"' in out
