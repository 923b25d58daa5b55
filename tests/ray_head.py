"""A Ray head started as a cluster operator starts one (`ray start --head --block`), for the tests
that talk to a cluster through its dashboard: every listener on 127.0.0.1, its own process group
and temp dir (named in every process it starts), so stopping it stops this cluster and no other."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_env(drop: set[str] = frozenset(), **extra: str) -> dict:
    """This environment without ``drop``, Ray's auth settings or RAY_ADDRESS, on loopback, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    return env | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                  "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")} | extra


@contextmanager
def ray_head(env: dict, num_cpus: int = 3, timeout_s: float = 90):
    """Yield the dashboard URL of a head started with ``env`` (see :func:`head_env`) once its
    dashboard answers (an authentication error counts as an answer); stop it afterwards."""
    temp = tempfile.mkdtemp(prefix="frh", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    dash = free_port()
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={free_port()}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
           "--disable-usage-stats", f"--temp-dir={temp}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/jobs/", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (and may ask for the token)
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the local Ray head did not come up") from None
                time.sleep(1)
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-KILL", "-f", temp], check=False)
        shutil.rmtree(temp, ignore_errors=True)
