"""A Ray cluster of several nodes on loopback for tests and benchmarks: a head (dashboard and Jobs
API on 127.0.0.1) and worker nodes, each with its own logical CPUs, label resource (``node1``,
``node2``, ...), temp dir and log monitor, as separate machines would have.

Usage::

    with LocalCluster(workers=2) as cluster:     # head + node1 + node2
        fmrilm submit ... --address cluster.dashboard
        cluster.kill("node1")                     # SIGKILL of its raylet and workers: a lost machine

The nodes are Ray's own ``ray.cluster_utils.Cluster`` in a helper process. `ray start` cannot do
this here: it refuses to add a worker node while Ray is held to loopback
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), and without that setting Ray rewrites 127.0.0.1 to the
machine's address. ``Cluster`` adds nodes only from the main thread of the process that owns
them, so the helper owns them, in its own process group with its own ``RAY_TMPDIR`` (its
``ray_current_cluster`` file and sessions never meet another Ray on the machine), and takes
commands on stdin: ``kill NAME``, ``add NAME``, ``stop``. Leaving the context kills the process
group and anything left under the helper's temp folder. It is ready once it has run a job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from fmrilm.errors import UserError

OBJECT_STORE_MB = 200  # per node: enough for the tests' tiny runs; benchmarks give more


class LocalClusterError(UserError, RuntimeError):
    """The local multi-node Ray cluster could not be started or commanded."""


class LocalCluster:
    """A head with ``head_cpus`` logical CPUs and ``workers`` worker nodes (``node1`` ... with
    ``worker_cpus`` each) and ``object_store_mb`` of object store per node, started with ``env``
    (default: this environment, on loopback);
    attributes once started: ``dashboard`` (URL), ``gcs`` (address for ``ray.init``) and
    ``node_ids`` (name -> node id)."""

    def __init__(self, workers: int = 2, head_cpus: int = 2, worker_cpus: int = 1, env: dict | None = None,
                 timeout_s: float = 120, object_store_mb: int = OBJECT_STORE_MB):
        self.workers, self.head_cpus, self.worker_cpus = workers, head_cpus, worker_cpus
        self.object_store_mb = object_store_mb
        self.env = dict(os.environ if env is None else env)
        self.timeout_s = timeout_s
        self.dashboard = self.gcs = ""
        self.node_ids: dict[str, str] = {}
        self._proc: subprocess.Popen | None = None
        self._temp = ""

    def start(self) -> "LocalCluster":
        self._temp = tempfile.mkdtemp(prefix="fmc", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
        args = json.dumps({"workers": self.workers, "head_cpus": self.head_cpus, "worker_cpus": self.worker_cpus, "temp": self._temp,
                           "object_store_mb": self.object_store_mb})
        env = self.env | {"RAY_TMPDIR": self._temp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        self._log = open(os.path.join(self._temp, "helper.log"), "w")
        self._proc = subprocess.Popen([sys.executable, "-m", "fmrilm.local_cluster", args], env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, text=True, start_new_session=True)
        deadline = time.monotonic() + self.timeout_s
        line = ""
        while not line:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = open(os.path.join(self._temp, "helper.log")).read()[-2000:]
                self.stop()
                raise LocalClusterError(f"the local Ray cluster did not come up within {self.timeout_s:.0f} s: {tail}")
            line = self._proc.stdout.readline()
        started = json.loads(line)
        self.dashboard, self.gcs, self.node_ids = started["dashboard"], started["gcs"], started["nodes"]
        return self

    def _command(self, line: str) -> dict:
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()
        reply = self._proc.stdout.readline()
        if not reply:
            raise LocalClusterError(f"the local cluster's helper exited on {line!r} (log: {self._temp}/helper.log)")
        answer = json.loads(reply)
        if "error" in answer:
            raise LocalClusterError(answer["error"])
        return answer

    def kill(self, name: str) -> None:
        """Kill node ``name`` (its raylet and every process it started; ``head``: also the GCS and
        dashboard, so the whole cluster) with SIGKILL."""
        self._command(f"kill {name}")

    def add(self, name: str) -> str:
        """Add a worker node ``name`` (``worker_cpus`` CPUs, label resource ``name``); returns its node id."""
        self.node_ids[name] = self._command(f"add {name}")["node_id"]
        return self.node_ids[name]

    def name_of(self, node_id: str) -> str:
        """The name of a node id (``head``, ``node1``, ...), else its first 8 characters."""
        return next((n for n, i in self.node_ids.items() if i == node_id), node_id[:8])

    def stop(self) -> None:
        """Stop every node and remove the helper's temp folder."""
        if self._proc is not None:
            try:
                self._proc.stdin.write("stop\n")
                self._proc.stdin.flush()
                self._proc.wait(20)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc = None
            self._log.close()
        if self._temp:
            subprocess.run(["pkill", "-KILL", "-f", self._temp], check=False)
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = ""

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _descendants(node) -> list:
    """Every process started below a Ray node's own processes (raylet, GCS, dashboard, ...)."""
    import psutil

    out = []
    for infos in node.all_processes.values():
        for info in infos:
            try:
                out += psutil.Process(info.process.pid).children(recursive=True)
            except psutil.Error:
                pass
    return out


def _wait_until_it_runs_a_job(dashboard: str, timeout_s: float = 90) -> None:
    """Ready means a job runs to the end: the head's job agent comes up after its raylet, and a
    submission before it answers "No available agent to submit job". Raises when the job fails
    or nothing succeeds within ``timeout_s``."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client = JobSubmissionClient(dashboard)
            job = client.submit_job(entrypoint="true")
            break
        except Exception:  # noqa: BLE001 - not ready yet; the deadline decides
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    while (status := str(client.get_job_status(job))) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the local cluster's first job is still {status} after {timeout_s:.0f} s")
        time.sleep(0.5)
    if status != "SUCCEEDED":
        raise RuntimeError(f"the local cluster's first job (`true`) ended {status}: see {dashboard}")


def _serve(workers: int, head_cpus: int, worker_cpus: int, temp: str, object_store_mb: int) -> None:
    """The helper's main thread: start the cluster, print its addresses, obey stdin."""
    import ray
    from ray.cluster_utils import Cluster

    from fmrilm.runtime import free_port

    dash = free_port()
    os.makedirs(os.path.join(temp, "ray"), exist_ok=True)  # RAY_TMPDIR/ray: where Ray writes ray_current_cluster
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dash,
        # its own agent port: the default (52365) is taken by any other Ray on the machine, and a head without its
        # agent answers every job submission with "No available agent to submit job"
        "dashboard_agent_listen_port": free_port(),
        "object_store_memory": object_store_mb * 2**20, "temp_dir": temp, "resources": {"head": 1}})
    nodes = {}

    def add(name: str) -> str:
        # each node its own temp dir and log monitor, as each machine has its own disk: nodes sharing one share the
        # unpacked runtime envs (one node's agent replaced the job driver's working_dir under it), and without its
        # log monitor a node's workers' output never reaches the driver
        node = cluster.add_node(num_cpus=worker_cpus, resources={name: 1}, object_store_memory=object_store_mb * 2**20,
                                temp_dir=os.path.join(temp, name), include_log_monitor=True)
        nodes[name] = node
        return node.node_id

    # what `ray start --head` leaves behind: the file a job's supervisor reads (in the head's temp dir) to tell its
    # driver the cluster's address; without it Ray falls back to any Ray process on the machine, and once another
    # local cluster's head is gone, drivers of this one dialled the dead head's address and hung
    from ray._private.utils import write_ray_address

    write_ray_address(cluster.address, temp)
    ids = {"head": cluster.head_node.node_id} | {f"node{i}": add(f"node{i}") for i in range(1, workers + 1)}
    cluster.wait_for_nodes()
    _wait_until_it_runs_a_job(f"http://127.0.0.1:{dash}")
    print(json.dumps({"dashboard": f"http://127.0.0.1:{dash}", "gcs": cluster.address, "nodes": ids}), flush=True)
    for line in sys.stdin:
        verb, _, name = line.strip().partition(" ")
        if (verb == "kill" and name != "head" and name not in nodes) or (verb == "add" and (name in nodes or name == "head")):
            print(json.dumps({"error": f"cannot {verb} node {name!r}: the nodes are head, {', '.join(nodes) or 'no workers'}"}), flush=True)
        elif verb == "kill":
            node = cluster.head_node if name == "head" else nodes.pop(name)
            below = _descendants(node)  # a lost machine takes every process on it: job drivers too
            cluster.remove_node(node, allow_graceful=False)
            for proc in below:
                try:
                    proc.kill()
                except Exception:  # noqa: BLE001 - already gone
                    pass
            print(json.dumps({"killed": name}), flush=True)
        elif verb == "add":
            node_id = add(name)
            cluster.wait_for_nodes()
            print(json.dumps({"node_id": node_id}), flush=True)
        elif verb == "stop":
            break
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    _serve(**json.loads(sys.argv[1]))
