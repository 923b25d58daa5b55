"""Two writers at once: two `fmrilm data synth` processes ingest different cohorts into one
dataset (local disk and the local S3 server). One commits a complete version; the other commits
nothing and says so; nothing either wrote is lost from under the winner, and `fmrilm data verify`
is clean afterwards."""

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fmrilm.cli import app
from fmrilm.data import table

pytestmark = pytest.mark.reliability


def _ingest(out: str, seed: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fmrilm", "data", "synth", "--out", out, "--subjects", "160", "--rois", "16", "--timepoints", "120",
           "--seed", str(seed), "--name", "shared", "--no-ray"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_concurrent_ingests_leave_one_complete_version(tmp_path, local_s3, where):
    out = str(tmp_path / "store") if where == "local" else local_s3.uri(f"concurrent-{os.getpid()}")
    procs = [_ingest(out, seed) for seed in (1, 2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = [r[0] for r in results]
    assert 0 in codes, results
    for code, stdout, stderr in results:
        if code != 0:  # the loser is told clearly, in one line, and committed nothing
            said = " ".join(stderr.split())  # the terminal wraps long lines
            assert code == 2 and "another writer committed version" in said and "Traceback" not in stderr, stderr
    loc, manifest = table.find_datasets(out)[0]
    assert manifest["rows"] == 160 and table.verify(loc, manifest) == []
    r = CliRunner().invoke(app, ["data", "verify", out])
    assert r.exit_code == 0 and "intact" in r.output, r.output
    # the winner's version is the only one left unless both committed one after the other
    versions = [n for n in __import__("fmrilm").storage.list_dir(loc) if n.startswith("v-")]
    assert manifest["version"] in versions and len(versions) == sum(c == 0 for c in codes)


def test_a_reader_streaming_a_version_is_not_cut_off_by_a_reingest(tmp_path, ray_cluster):
    """A training run streams the shards of the manifest it read; a re-ingest commits a new
    version meanwhile and deletes nothing, so the stream ends with every window of its version."""
    from fmrilm.data.ingest import ingest_synthetic
    from fmrilm.data.pipeline import PipelineSpec, build_windows
    from fmrilm.data.synth import SynthParams

    root = str(tmp_path / "datasets")
    params = SynthParams(name="live", subjects=12, n_rois=8, n_networks=2, n_timepoints=64, seed=1)
    first = ingest_synthetic(params, root, use_ray=False).manifest
    ds, n = build_windows(PipelineSpec(root=root, window=16, stride=16), None)
    rows = iter(ds.iter_rows())
    seen = [next(rows)]
    second = ingest_synthetic(params.model_copy(update={"seed": 2, "subjects": 20}), root, use_ray=False).manifest
    assert second["version"] != first["version"]
    seen += list(rows)
    assert len(seen) == n == first["rows"] * 4


def test_a_stale_lock_is_taken_over_by_exactly_one_contender(tmp_path):
    """Two drivers both held a dead driver's run lock in 8 of 20 trials; two writers were both told
    "committed" from one base with a stale commit lock: whoever deleted the stale lock could delete
    the one another contender had just created."""
    import json
    import threading
    import time as _time

    from fmrilm import storage
    from fmrilm.data import table
    from fmrilm.train.run_lock import RUN_LOCK, RunBusy, RunLock

    for trial in range(5):
        run_dir = storage.resolve(str(tmp_path / f"run{trial}"))
        storage.write_text(run_dir.join(RUN_LOCK), json.dumps({"host": "gone-host", "pid": 1, "token": f"dead{trial}", "heartbeat": 0}))
        held, busy, start = [], [], threading.Barrier(6)

        def contend():
            start.wait()
            try:
                held.append(RunLock(run_dir, "r").acquire())
            except RunBusy:
                busy.append(1)

        threads = [threading.Thread(target=contend) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(held) == 1 and len(busy) == 5, (trial, len(held))
        held[0].release()

        dataset = storage.resolve(str(tmp_path / f"ds{trial}"))
        storage.write_text(dataset.join(table.LOCK), json.dumps({"owner": f"gone:1:dead{trial}", "at": 0.0}))
        inside, overlaps, go = [0], [], threading.Barrier(6)

        def commit_like():
            go.wait()
            me = table._acquire(dataset, timeout_s=30)
            inside[0] += 1
            overlaps.append(inside[0])
            _time.sleep(0.05)
            inside[0] -= 1
            table._release(dataset, me)

        threads = [threading.Thread(target=commit_like) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(overlaps) == 6 and max(overlaps) == 1, overlaps
