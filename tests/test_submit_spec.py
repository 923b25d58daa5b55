"""Submission specs without a cluster: what travels in the runtime_env, which environment
variables may go, which paths a remote cluster can see."""

import os

import pytest

from fmrilm import submit
from fmrilm.registry import load_job


def test_runtime_env_uploads_the_staged_checkout():
    env = submit.runtime_env("/tmp/staged", {"A": "1"})
    assert env == {"working_dir": "/tmp/staged", "py_modules": ["/tmp/staged/platform/fmrilm"], "env_vars": {"A": "1"}}
    assert submit.entrypoint("jobs/x.yaml", ["a.b=c d"]) == "python -m fmrilm run jobs/x.yaml 'a.b=c d'"
    files = submit.upload_files(submit.project_root())
    assert "platform/fmrilm/cli.py" in files and "jobs/tokenizer.yaml" in files and "pyproject.toml" in files
    assert not [f for f in files if f.startswith((".git/", ".venv/", "fmrilm-data/")) or f.endswith((".parquet", ".safetensors"))]


@pytest.mark.parametrize("name, value", [
    ("MY_SERVICE_KEY", "abc"), ("DATABASE_URL", "postgres://u:p@db/x"), ("AZURE_STORAGE_CONNECTION_STRING", "x"), ("PGPASS", "x"),
    ("PGPASSWORD", "x"), ("SENTRY_DSN", "x"), ("GOOGLE_APPLICATION_CREDENTIALS", "/k.json")])
def test_env_names_that_look_like_credentials_are_refused(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(submit.SubmitError, match=f"{name}: credentials are never sent"):
        submit.check_env([name])


@pytest.mark.parametrize("value", [
    "AKIA" + "Q" * 16, "postgresql://admin:hunter2@db.internal:5432/x", "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=zzz",
    "-----BEGIN RSA PRIVATE KEY-----", "ghp_" + "a1B2" * 9, "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY9x"])
def test_env_values_that_look_like_credentials_are_refused_unshown(monkeypatch, value):
    monkeypatch.setenv("MY_SETTING", value)
    with pytest.raises(submit.SubmitError, match="the value of MY_SETTING looks like a credential") as err:
        submit.check_env(["MY_SETTING"])
    assert value not in str(err.value)
    monkeypatch.setenv("MY_SETTING", "us-east-1")
    assert submit.check_env(["MY_SETTING"]) == {"MY_SETTING": "us-east-1"}


def test_uris_with_embedded_credentials_are_refused_without_echoing_them():
    from typer.testing import CliRunner

    from fmrilm import storage
    from fmrilm.cli import app
    from fmrilm.config import ConfigError

    secret = "s3://AKID123:s3cr3tVALUE@bucket/runs"
    with pytest.raises(ConfigError) as err:
        load_job("jobs/tokenizer.yaml", [f"run.storage={secret}"])
    assert "run.storage embed(s) credentials" in str(err.value) and "s3cr3tVALUE" not in str(err.value)
    with pytest.raises(storage.StorageError) as err:
        storage.resolve(secret)
    assert "s3://***@bucket/runs embeds credentials" in str(err.value) and "s3cr3tVALUE" not in str(err.value)
    r = CliRunner().invoke(app, ["data", "inspect", secret])
    assert r.exit_code == 2 and "s3cr3tVALUE" not in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["run", "jobs/tokenizer.yaml", f"run.storage={secret}"])
    assert r.exit_code == 2 and "s3cr3tVALUE" not in r.output and "embed(s) credentials" in r.output


@pytest.mark.parametrize("name", ["GH_PAT", "APIKEY", "MY_JWT", "BEARER", "REDIS_URL", "MONGODB_URI"])
def test_more_credential_names_are_refused(monkeypatch, name):
    monkeypatch.setenv(name, "x")
    with pytest.raises(submit.SubmitError, match=f"{name}: credentials are never sent"):
        submit.check_env([name])


@pytest.mark.parametrize("value", [
    "0123456789abcdef" * 4,  # `openssl rand -hex 32`, the format of the Ray auth token the docs create
    "hf_" + "aB3dE" * 7, "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJl", "glpat-" + "x1Y2z3" * 4,
    "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc", "s3://bucket/data?secret_key=abc123", "https://h/x?X-Amz-Signature=deadbeef&a=1"])
def test_more_credential_values_are_refused_unshown(monkeypatch, value):
    monkeypatch.setenv("MY_SETTING", value)
    with pytest.raises(submit.SubmitError, match="the value of MY_SETTING looks like a credential") as err:
        submit.check_env(["MY_SETTING"])
    assert value not in str(err.value)


@pytest.mark.parametrize("value", ["us-east-1", "s3://bucket/fmrilm/datasets", "http://127.0.0.1:8265", "/work/fmrilm-data/runs",
                                   "Qwen/Qwen3-0.6B", "train.epochs=3"])
def test_ordinary_values_pass(monkeypatch, value):
    monkeypatch.setenv("MY_SETTING", value)
    assert submit.check_env(["MY_SETTING"]) == {"MY_SETTING": value}


def test_a_secret_in_a_uri_query_is_refused_and_redacted():
    from fmrilm import config
    from fmrilm.errors import redact
    from fmrilm.train.tokenizer import TokenizerStageSpec

    with pytest.raises(config.ConfigError, match=r"data.root embed\(s\) credentials in a URI") as err:
        config.build(TokenizerStageSpec, {"data": {"root": "s3://bucket/d?secret_key=abc123"}})
    assert "abc123" not in str(err.value)
    assert redact("reading s3://b/x?token=abc123&region=eu failed") == "reading s3://b/x?token=***&region=eu failed"


def test_a_submitted_driver_leaves_the_jobs_own_env_vars_to_the_job(monkeypatch):
    """Ray refuses a ray.init whose runtime env sets a variable the job's runtime env sets too
    (a spec's submit.env naming e.g. FMRILM_VERBOSE): init_ray leaves those to the job."""
    import json

    from fmrilm import runtime

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"FMRILM_VERBOSE": "1"}}}))
    assert runtime._job_env() == {"FMRILM_VERBOSE": "1"}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{not json")
    assert runtime._job_env() == {}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert runtime._job_env() == {}


def test_placement_and_the_hold_fault_are_spelled_as_ray_and_the_tests_need(monkeypatch):
    from pydantic import ValidationError

    from fmrilm.train.faults import fault_plan
    from fmrilm.train.specs import ScalingSpec

    assert ScalingSpec().placement_strategy == "PACK"
    assert ScalingSpec(placement="strict_spread").placement_strategy == "STRICT_SPREAD"
    with pytest.raises(ValidationError):
        ScalingSpec(placement="everywhere")
    monkeypatch.setenv("FMRILM_FAULT_STEP", "hold:4")
    monkeypatch.setenv("FMRILM_FAULT_HOLD_S", "7")
    assert fault_plan() == {"kind": "hold", "step": 4, "hold_s": 7.0}


def test_status_lists_a_run_s_recoveries_from_its_log():
    log = ("starting\n\x1b[36m(RayTrainWorker pid=5)\x1b[0m resumed at step 4 from s3://b/run/checkpoint_0000004\n"
           "16:00:01 WARNING run 'r': the cluster lost 1 node(s) during the run (ab12cd34 (10.0.0.7)); the workers restarted\n"
           "\x1b[36m(RayTrainWorker pid=5)\x1b[0m resumed at step 4 from s3://b/run/checkpoint_0000004\nloss 0.1 (step 8)\n")
    assert submit.recoveries(log) == ["resumed at step 4 from s3://b/run/checkpoint_0000004",
                                      "16:00:01 WARNING run 'r': the cluster lost 1 node(s) during the run (ab12cd34 (10.0.0.7)); "
                                      "the workers restarted"]
    assert submit.recoveries("loss 0.1 (step 8)\n") == []
