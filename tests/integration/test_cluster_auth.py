"""A Ray head with token authentication, as cluster/ starts them (RAY_AUTH_MODE=token): the Jobs
API refuses a request without the token, and `fmrilm status` / `fmrilm submit` work when the
token is in RAY_AUTH_TOKEN (what cluster/README.md tells a user to export), and say in one line
what to do when it is missing or wrong."""

import json
import secrets
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.ray_head import head_env, ray_head

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def token_head():
    token = secrets.token_hex(32)
    with ray_head(head_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token), num_cpus=1) as address:
        yield address, token


def _fmrilm(*args, **env):
    return subprocess.run([sys.executable, "-m", "fmrilm", *args], env=head_env(**env), capture_output=True, text=True, timeout=120)


def test_the_jobs_api_refuses_requests_without_the_token(token_head):
    address, _ = token_head
    body = json.dumps({"entrypoint": "echo pwned"}).encode()
    req = urllib.request.Request(f"{address}/api/jobs/", data=body, headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code in (401, 403)


def test_fmrilm_talks_to_it_with_the_token_and_says_what_to_do_without(token_head):
    address, token = token_head
    ok = _fmrilm("status", "--address", address, "--json", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    assert ok.returncode == 0 and ok.stdout.strip().startswith("["), ok.stderr
    for env in ({}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "wrong" + token[5:]}):
        bad = _fmrilm("status", "--address", address, **env)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
        assert "token" in bad.stderr and "RAY_AUTH_TOKEN" in bad.stderr and token[8:] not in bad.stderr
