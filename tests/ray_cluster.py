"""A Ray cluster of several nodes on 127.0.0.1 for the multi-node tests: a head (dashboard and
Jobs API on loopback) and worker nodes, each with its own logical CPUs and a label resource
(``node1``, ``node2``, ...), started by Ray's own ``ray.cluster_utils.Cluster`` in a helper process.

Why a helper process: `ray start` refuses to join a worker node while Ray is held to loopback
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), and without that setting Ray rewrites 127.0.0.1 to the
machine's address; ``Cluster`` starts real raylets on loopback, but only from the main thread of
the process that owns them. The helper owns them, in its own process group with its own
``RAY_TMPDIR`` (so its ``ray_current_cluster`` file and sessions never meet another Ray on the
machine), and takes commands on stdin: ``kill NAME`` (SIGKILL of that node's raylet and workers,
as a lost machine), ``add NAME`` (a replacement node), ``stop``. Stopping the context manager
kills the process group and anything left under the helper's temp folder.
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
from contextlib import contextmanager

OBJECT_STORE = 200 * 2**20


class Nodes:
    """The running cluster as the tests see it: dashboard URL, GCS address, node name -> node id."""

    def __init__(self, proc: subprocess.Popen, started: dict):
        self._proc = proc
        self.dashboard = started["dashboard"]
        self.gcs = started["gcs"]
        self.node_ids: dict[str, str] = started["nodes"]

    def _command(self, line: str) -> dict:
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()
        reply = self._proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"the cluster helper exited on {line!r}")
        return json.loads(reply)

    def kill(self, name: str) -> None:
        """Kill node ``name`` (its raylet and every process it started) with SIGKILL."""
        self._command(f"kill {name}")

    def add(self, name: str) -> str:
        """Add a worker node ``name`` (1 CPU, label resource ``name``); returns its node id."""
        self.node_ids[name] = self._command(f"add {name}")["node_id"]
        return self.node_ids[name]

    def name_of(self, node_id: str) -> str:
        return next((n for n, i in self.node_ids.items() if i == node_id), node_id[:8])


@contextmanager
def ray_nodes(env: dict, workers: int = 2, head_cpus: int = 2, worker_cpus: int = 1, timeout_s: float = 120):
    """Yield :class:`Nodes` of a head with ``head_cpus`` logical CPUs and ``workers`` worker nodes
    (``node1`` ... with ``worker_cpus`` each), started with ``env`` (see ``tests.ray_head.head_env``;
    token auth where it says so); everything it started is killed afterwards."""
    temp = tempfile.mkdtemp(prefix="fmc", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    args = json.dumps({"workers": workers, "head_cpus": head_cpus, "worker_cpus": worker_cpus, "temp": temp})
    proc = subprocess.Popen([sys.executable, "-m", "tests.ray_cluster", args], env=env | {"RAY_TMPDIR": temp},
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=open(os.path.join(temp, "helper.log"), "w"), text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        line = ""
        while not line:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the local Ray cluster did not come up: " + open(os.path.join(temp, "helper.log")).read()[-2000:])
            line = proc.stdout.readline()
        yield Nodes(proc, json.loads(line))
    finally:
        try:
            proc.stdin.write("stop\n")
            proc.stdin.flush()
            proc.wait(20)
        except (OSError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        subprocess.run(["pkill", "-KILL", "-f", temp], check=False)
        shutil.rmtree(temp, ignore_errors=True)


def _serve(workers: int, head_cpus: int, worker_cpus: int, temp: str) -> None:
    """The helper's main thread: start the cluster, print its addresses, obey stdin."""
    import ray
    from ray.cluster_utils import Cluster

    from tests.ray_head import free_port

    dash = free_port()
    os.makedirs(os.path.join(temp, "ray"), exist_ok=True)  # RAY_TMPDIR/ray: where Ray writes ray_current_cluster
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dash,
        "object_store_memory": OBJECT_STORE, "temp_dir": temp, "resources": {"head": 1}})
    nodes = {}

    def add(name: str) -> str:
        # each node its own temp dir, as each machine has its own disk: nodes sharing one would share the unpacked
        # runtime envs, and one node's agent replaced the job driver's working_dir under it
        node = cluster.add_node(num_cpus=worker_cpus, resources={name: 1}, object_store_memory=OBJECT_STORE,
                                temp_dir=os.path.join(temp, name))
        nodes[name] = node
        return node.node_id

    ids = {"head": cluster.head_node.node_id} | {f"node{i}": add(f"node{i}") for i in range(1, workers + 1)}
    cluster.wait_for_nodes()
    print(json.dumps({"dashboard": f"http://127.0.0.1:{dash}", "gcs": cluster.address, "nodes": ids}), flush=True)
    for line in sys.stdin:
        verb, _, name = line.strip().partition(" ")
        if verb == "kill":
            cluster.remove_node(nodes.pop(name), allow_graceful=False)
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
