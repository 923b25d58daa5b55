"""A command that starts Ray starts its own local instance: a `/tmp/ray/ray_current_cluster` file
left by an earlier `ray start` (or a killed cluster, or another project) is not a cluster to join."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.reliability

ADDRESS_FILE = "/tmp/ray/ray_current_cluster"


def test_a_stale_ray_address_file_does_not_stop_a_local_run(tmp_path):
    saved = open(ADDRESS_FILE).read() if os.path.exists(ADDRESS_FILE) else None
    os.makedirs(os.path.dirname(ADDRESS_FILE), exist_ok=True)
    with open(ADDRESS_FILE, "w") as f:
        f.write("127.0.0.1:1\n")  # a head that is long gone
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        r = subprocess.run([sys.executable, "-m", "fmrilm", "data", "synth", "--subjects", "4", "--rois", "8", "--networks", "2",
                            "--timepoints", "30", "--out", str(tmp_path / "ds")], capture_output=True, text=True, env=env, timeout=300)
    finally:
        if saved is None:
            os.remove(ADDRESS_FILE)
        else:
            with open(ADDRESS_FILE, "w") as f:
                f.write(saved)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "written 4 scans" in r.stdout + r.stderr
