"""Submission specs without a cluster: what travels in the runtime_env, which environment
variables may go, which paths a remote cluster can see."""

import os

import pytest

from fmrilm import submit
from fmrilm.registry import load_job


def test_runtime_env_uploads_the_checkout_without_data_runs_or_vcs():
    root = submit.project_root()
    env = submit.runtime_env(root, {"A": "1"})
    assert env["working_dir"] == root and env["py_modules"] == [os.path.join(root, "platform", "fmrilm")]
    assert {".git", ".venv", "fmrilm-data", "runs", "*.parquet", "*.safetensors"} <= set(env["excludes"])
    assert env["env_vars"] == {"A": "1"}
    assert submit.entrypoint("jobs/x.yaml", ["a.b=c d"]) == "python -m fmrilm run jobs/x.yaml 'a.b=c d'"


def test_credentials_and_unset_variables_are_refused(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("HF_TOKEN", "x")
    monkeypatch.setenv("WANDB_PROJECT", "p")
    with pytest.raises(submit.SubmitError, match="AWS_SECRET_ACCESS_KEY, HF_TOKEN: credentials are never sent"):
        submit.check_env(["AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "WANDB_PROJECT"])
    with pytest.raises(submit.SubmitError, match="NOT_SET_ANYWHERE, which is not set"):
        submit.check_env(["WANDB_PROJECT", "NOT_SET_ANYWHERE"])
    assert submit.check_env(["WANDB_PROJECT"]) == {"WANDB_PROJECT": "p"}
    with pytest.raises(submit.SubmitError, match="credentials are never sent"):  # before any cluster is contacted
        submit.submit("jobs/tokenizer.yaml", ["submit.env=[AWS_SECRET_ACCESS_KEY]"], "http://127.0.0.1:9")


def test_local_paths_absolute_on_loopback_refused_on_a_remote_cluster():
    root = submit.project_root()
    spec, _, sub = load_job("jobs/tokenizer.yaml", ["run.storage=s3://bucket/runs"])
    assert sub.env == []
    fixed = submit.path_overrides(spec, "http://127.0.0.1:8265", root)
    assert f"data.data={os.path.abspath('fmrilm-data/datasets')}" in fixed and not any(f.startswith("run.storage") for f in fixed)
    with pytest.raises(submit.SubmitError, match=r"cannot see: data\.data=\./fmrilm-data/datasets, run\.log_dir="):
        submit.path_overrides(spec, "http://10.0.0.5:8265", root)
    assert submit.run_name(spec) == "tokenizer"
    # a file inside the checkout travels with the job (working_dir): the sweep's base spec stays relative
    sweep, _, _ = load_job("jobs/sweep_tokenizer.yaml", ["storage=s3://bucket/sweeps"])
    assert submit.path_overrides(sweep, "http://10.0.0.5:8265", root) == []
    assert submit.travels("jobs/tokenizer.yaml", root) and not submit.travels("fmrilm-data", root)


def test_submit_section_is_validated_and_ignored_by_run():
    from fmrilm.config import ConfigError

    with pytest.raises(ConfigError, match="submit.*envs: unknown key"):
        load_job("jobs/tokenizer.yaml", ["submit.envs=[X]"])
    spec, _, sub = load_job("jobs/tokenizer.yaml", ["submit.env=[X]"])
    assert sub.env == ["X"] and not hasattr(spec, "submit")


def test_bad_addresses_fail_with_a_clear_message():
    with pytest.raises(submit.SubmitError, match="give the Ray dashboard URL"):
        submit.connect("127.0.0.1:8265")
    with pytest.raises(submit.SubmitError, match="cannot reach the Ray dashboard at http://127.0.0.1:9"):
        submit.connect("http://127.0.0.1:9", timeout_s=1)



def test_credential_files_and_gitignored_paths_never_travel(tmp_path):
    """What Ray's working_dir upload leaves out, matched the way Ray matches (gitignore patterns)."""
    from ray._private.thirdparty.pathspec import PathSpec  # what Ray matches runtime_env excludes with

    root = tmp_path / "checkout"
    (root / "platform" / "fmrilm").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    (root / ".gitignore").write_text("# local notes\nscratch/\n*.local\n")
    secret_files = [".env", ".env.production", "id_rsa", "id_ed25519.pub", ".netrc", ".aws/credentials", "deploy/key.pem",
                    "infra/terraform/terraform.tfvars", ".ssh/config", "gcp-service-account.json", "scratch/notes.txt", "x.local"]
    kept = ["jobs/tokenizer.yaml", "platform/fmrilm/cli.py", "README.md"]
    for rel in secret_files + kept:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    spec = PathSpec.from_lines("gitwildmatch", submit.runtime_env(str(root), {})["excludes"])
    assert [f for f in secret_files if not spec.match_file(f)] == []
    assert [f for f in kept if spec.match_file(f)] == []


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

    with pytest.raises(config.ConfigError, match=r"data.data embed\(s\) credentials in a URI") as err:
        config.build(TokenizerStageSpec, {"data": {"data": "s3://bucket/d?secret_key=abc123"}})
    assert "abc123" not in str(err.value)
    assert redact("reading s3://b/x?token=abc123&region=eu failed") == "reading s3://b/x?token=***&region=eu failed"
