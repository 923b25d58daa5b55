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
    ds, n = build_windows(PipelineSpec(data=root, window=16, stride=16), None)
    rows = iter(ds.iter_rows())
    seen = [next(rows)]
    second = ingest_synthetic(params.model_copy(update={"seed": 2, "subjects": 20}), root, use_ray=False).manifest
    assert second["version"] != first["version"]
    seen += list(rows)
    assert len(seen) == n == first["rows"] * 4
