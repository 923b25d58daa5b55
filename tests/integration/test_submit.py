"""`fmrilm submit / status / logs / stop` end to end against a real Ray head started with
`ray start --head` on 127.0.0.1 (dashboard and Jobs API on loopback): a tiny tokenizer job runs
to SUCCEEDED, its log is readable, a re-submission under the same run name resumes it, a
running job stops, and neither the runtime_env nor the logs carry the submitter's credentials."""

import os
import time

import pytest
from typer.testing import CliRunner

from fmrilm import submit
from fmrilm.cli import app

from tests.credentials import fake_aws_credentials
from tests.ray_head import free_port, head_env
from tests.ray_head import ray_head as start_head

pytestmark = pytest.mark.integration
FAKE = fake_aws_credentials()
TINY = ["model.num_codes=16", "model.width=16", "model.depth=1", "model.heads=2", "model.code_dim=8", "train.checkpoint_every=2",
        "scaling.num_workers=1", "run.logger=none"]


@pytest.fixture(scope="module")
def ray_head():
    """A local head without token auth (tests/ray_head.py) whose environment holds none of the fake credentials."""
    with start_head(head_env(drop=set(FAKE), RAY_AUTH_MODE="disabled")) as address:
        submit.connect(address).list_jobs()
        yield address


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from fmrilm.data.ingest import ingest_synthetic
    from fmrilm.data.synth import SynthParams

    """A small synthetic cohort, written before the head starts (an in-process `ray.init()` would
    otherwise join that cluster)."""
    root = tmp_path_factory.mktemp("submit")
    ingest_synthetic(SynthParams(name="synthetic", subjects=12, n_rois=8, n_networks=4, n_timepoints=96, seed=2), str(root / "datasets"))
    return root


def _cli(*args):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_submit_status_logs_then_resubmit_resumes(cohort, ray_head, monkeypatch):
    for k, v in FAKE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FMRILM_TEST_TAG", "submitted-by-test")
    common = ["jobs/tokenizer.yaml", f"data.root={cohort / 'datasets'}", f"run.storage={cohort / 'runs'}", "run.name=tok-submit",
              "submit.env=[FMRILM_TEST_TAG]", *TINY, "--address", ray_head]
    code, out = _cli("submit", *common, "train.epochs=2", "train.max_steps=4")  # 2 steps an epoch
    assert code == 0, out
    assert submit.wait("tok-submit", ray_head, 300) == "SUCCEEDED", submit.logs("tok-submit", ray_head)
    code, out = _cli("status", "tok-submit", "--address", ray_head, "--json")
    assert code == 0 and '"SUCCEEDED"' in out and '"tokenizer"' in out
    first = submit.logs("tok-submit", ray_head)
    assert "tokenizer artifact" in first and (cohort / "runs" / "tok-submit" / "tokenizer").exists()

    # the same run name again, with more steps: the job record is replaced and the run resumes
    code, out = _cli("submit", *common, "train.epochs=4", "train.max_steps=8", "--follow")
    assert code == 0 and "re-submitted" in out, out
    again = submit.logs("tok-submit", ray_head)
    assert "resumed at step 4" in again
    assert submit.job_info("tok-submit", ray_head).submission_id == "tok-submit.2"  # the attempt; the run is the same

    info = submit.job_info("tok-submit", ray_head)
    assert info.runtime_env.get("env_vars") == {"FMRILM_TEST_TAG": "submitted-by-test"}  # only what the spec names
    seen = repr(info.runtime_env) + repr(info.entrypoint) + repr(info.metadata) + first + again
    for secret in FAKE.values():
        assert secret not in seen
    for d, _, files in os.walk(cohort / "runs" / "tok-submit"):  # nor in checkpoints, specs or the artifact
        for f in files:
            data = open(os.path.join(d, f), "rb").read()
            assert not any(s.encode() in data for s in FAKE.values()), os.path.join(d, f)


def test_stop_a_running_job(cohort, ray_head):
    r = submit.submit("jobs/tokenizer.yaml", [f"data.root={cohort / 'datasets'}", f"run.storage={cohort / 'runs'}",
                                              "run.name=tok-stop", *TINY, "train.epochs=500"], ray_head)
    deadline = time.monotonic() + 120
    while str(submit.job_info(r["id"], ray_head).status) != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(1)
    code, out = _cli("submit", "jobs/tokenizer.yaml", "run.name=tok-stop", f"data.root={cohort / 'datasets'}", "--address", ray_head)
    assert code == 2 and "already RUNNING" in out
    code, out = _cli("stop", "tok-stop", "--address", ray_head)
    assert code == 0 and "STOPPED" in out


def test_unreachable_address_fails_fast():
    start = time.monotonic()
    code, out = _cli("submit", "jobs/tokenizer.yaml", "--address", f"http://127.0.0.1:{free_port()}")
    assert code == 2 and "cannot reach the Ray dashboard" in out
    assert time.monotonic() - start < 15
