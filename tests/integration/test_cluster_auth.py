"""A Ray head with token authentication, as cluster/ starts them (RAY_AUTH_MODE=token): the Jobs
API refuses a request without the token, and `fmrilm status` / `fmrilm submit` work when the
token is in RAY_AUTH_TOKEN (what cluster/README.md tells a user to export), and say in one line
what to do when it is missing or wrong."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)
    return env | extra


@pytest.fixture(scope="module")
def token_head():
    token = secrets.token_hex(32)
    temp = tempfile.mkdtemp(prefix="fra", dir="/tmp")
    dash = _free_port()
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={_free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={_free_port()}", "--num-cpus=1", "--include-dashboard=true",
           "--disable-usage-stats", f"--temp-dir={temp}"]
    proc = subprocess.Popen(cmd, env=_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token), stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # it answers (and asks for the token)
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the token-auth Ray head did not come up") from None
            time.sleep(1)
    yield address, token
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-KILL", "-f", temp], check=False)
    shutil.rmtree(temp, ignore_errors=True)


def _fmrilm(*args, **env):
    return subprocess.run([sys.executable, "-m", "fmrilm", *args], env=_env(**env), capture_output=True, text=True, timeout=120)


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
