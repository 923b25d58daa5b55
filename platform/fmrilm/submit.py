"""Ray Jobs: run a job spec on a Ray cluster and follow it (``fmrilm submit / status / logs / stop``).

A submission is the same ``fmrilm run SPEC key=value ...`` a user runs locally, started on the
cluster by the Ray Jobs API (:class:`ray.job_submission.JobSubmissionClient`) with a runtime
environment holding this checkout (``working_dir``: an allowlist, the checkout's tracked files and
the files the spec names, never credential files, data or runs) and the ``fmrilm`` package (``py_modules``, so every worker imports the submitted code, not an older
copy in the image). The spec is validated here first, so a bad key fails before anything is sent.

The submission id is the run name (``run.name`` of the spec, else its ``name``, else its kind);
re-submitting a finished or failed run starts attempt ``NAME.2``, ``NAME.3``, ... of the same run,
which resumes from its checkpoints (Ray keeps each attempt's record and log; reusing one id after
``delete_job`` races with the old job's monitor in Ray 2.60 and marks the new job FAILED).
``fmrilm status/logs/stop NAME`` act on the newest attempt of a run (or on one exact id).

Environment variables reach the job only when the spec names them in its ``submit.env`` list;
names that look like credentials are refused: workers read object storage with their instance or
pod role. Local paths in a spec mean nothing to a remote cluster and are refused there; on a
cluster on this machine (127.0.0.1) they are made absolute, as for local Ray workers.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import time
from contextlib import contextmanager
from urllib.parse import urlparse

from fmrilm import storage
from fmrilm.errors import UserError, embeds_credentials

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# never uploaded: data, run outputs, weights, VCS and environments (Ray's working_dir limit is 500 MiB)
EXCLUDES = [".git", ".venv", "venv", "fmrilm-data", "runs", "**/__pycache__", ".pytest_cache", "*.egg-info",
            "*.parquet", "*.safetensors", "*.pt", "*.bin", "*.nii", "*.nii.gz", ".terraform", "*.tfstate*", ".gpu"]
# never uploaded either: files that hold credentials (keys, tokens, cloud and tool configs)
CREDENTIAL_FILES = [".env", ".env.*", "*.env", ".envrc", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.pem", "*.key", "*.p12",
                    "*.pfx", "*.jks", ".netrc", "_netrc", ".aws", ".ssh", ".gnupg", ".kube", "kubeconfig*", ".docker", ".git-credentials",
                    ".npmrc", ".pypirc", ".boto", ".s3cfg", "credentials", "credentials.*", "*credentials*.json", "*service-account*.json", "*serviceaccount*.json",
                    "terraform.tfvars", "*.tfvars", "*.tfvars.json", "secrets.*", "*.secret", ".htpasswd", "gcloud", ".pgpass", ".my.cnf",
                    "kaggle.json", "client_secret*.json", ".vault-token", ".config", "*_history", "*token*.json", "*service_account*.json",
                    ".hf_token", ".huggingface", ".wandb", ".netrc*"]
CREDENTIAL_NAME = re.compile(r"SECRET|TOKEN|PASS|CREDENTIAL|PRIVATE|ACCESS_KEY|API_?KEY|_KEY$|^KEY_|_KEY_|AUTH|COOKIE|SESSION|"
                             r"DATABASE_URL|_DSN$|CONNECTION_STRING|CONN_STR|SAS$|SIGNATURE|CERT|JWT|BEARER|(^|_)PAT($|_)|"
                             r"(REDIS|MONGO\w*|AMQP|BROKER|CELERY\w*|POSTGRES\w*|MYSQL\w*|DB)_(URL|URI)$", re.IGNORECASE)
# values that are credentials whatever the variable is called
CREDENTIAL_VALUE = re.compile(
    r"\b(AKIA|ASIA|AROA|AIDA)[0-9A-Z]{16}\b|-----BEGIN [A-Z ]*PRIVATE KEY|\bgh[pousr]_[A-Za-z0-9]{30,}|\bxox[abprs]-|"
    r"\bsk-[A-Za-z0-9_-]{20,}|\bAIza[0-9A-Za-z_-]{30,}|AccountKey=|SharedAccessSignature=|\bsig=[A-Za-z0-9%/+]{20,}|"
    r"\bhf_[A-Za-z0-9]{30,}|\bglpat-[A-Za-z0-9_-]{20,}|\b[sr]k_(live|test)_[A-Za-z0-9]{16,}|"
    r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.|"  # a JWT: base64url JSON header and payload
    r"(password|pwd|secret|token)\s*[=:]", re.IGNORECASE)
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(UserError, RuntimeError):
    """A submission that cannot go ahead (unreachable cluster, local paths, secret env, ...)."""


def looks_secret(value: str) -> bool:
    """Whether a value looks like a credential: a known key format (AWS, GitHub, GitLab, Hugging
    Face, Stripe, Slack, OpenAI, Google, a JWT), a private key, a connection string or a URI with a
    password or a secret query parameter, or a long random-looking token (32+ hex or base64 characters)."""
    value = str(value)
    if CREDENTIAL_VALUE.search(value) or embeds_credentials(value):
        return True
    text = value.strip()
    if re.fullmatch(r"[0-9a-fA-F]{32,}", text):  # hex keys and tokens (`openssl rand -hex 16` and longer)
        return True
    token = re.fullmatch(r"[A-Za-z0-9+/=_-]{32,}", text)
    return bool(token) and len(set(text)) > 12 and any(c.isdigit() for c in text) and any(c.isalpha() for c in text)


def check_env(names: list[str]) -> dict[str, str]:
    """The named variables from this environment; refuses names that look like credentials
    (``*_KEY``, ``*SECRET*``, ``*PASS*``, connection strings, ...), values that do (key formats,
    tokens, URIs with passwords; the value is never shown), and unset names."""
    secret = [n for n in names if CREDENTIAL_NAME.search(n)]
    if secret:
        raise SubmitError(f"submit.env names {', '.join(secret)}: credentials are never sent with a job; cluster workers "
                          "read object storage with their instance profile / pod service account (see cluster/README.md)")
    unset = [n for n in names if n not in os.environ]
    if unset:
        raise SubmitError(f"submit.env names {', '.join(unset)}, which {'is' if len(unset) == 1 else 'are'} not set here")
    valued = [n for n in names if looks_secret(os.environ[n])]
    if valued:
        raise SubmitError(f"submit.env: the value of {', '.join(valued)} looks like a credential (not shown): it is not sent with "
                          "the job; give the cluster's workers a role instead (see cluster/README.md)")
    return {n: os.environ[n] for n in names}


def gitignore_patterns(root: str) -> list[str]:
    """The patterns of the checkout's top-level ``.gitignore`` (comments, blanks and negations left out)."""
    try:
        with open(os.path.join(root, ".gitignore")) as f:
            lines = [ln.strip() for ln in f]
    except OSError:
        return []
    return [ln for ln in lines if ln and not ln.startswith(("#", "!"))]


def resolve_address(address: str | None) -> str:
    """``address``, else ``RAY_ADDRESS`` when it is a dashboard URL, else the local default."""
    address = address or (os.environ.get("RAY_ADDRESS", "") if os.environ.get("RAY_ADDRESS", "").startswith("http") else "")
    return address or DEFAULT_ADDRESS


def is_loopback(address: str) -> bool:
    host = urlparse(address).hostname or ""
    return host in ("127.0.0.1", "localhost", "::1")


def connect(address: str | None, timeout_s: float = 5.0):
    """A ``JobSubmissionClient`` for the cluster's dashboard; fails fast with a clear message."""
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    url = urlparse(address)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise SubmitError(f"--address {address!r}: give the Ray dashboard URL, e.g. http://127.0.0.1:8265")
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout_s):
            pass
    except OSError as err:
        raise SubmitError(f"cannot reach the Ray dashboard at {address} ({err}). Is the cluster up? For a cloud cluster "
                          "open the tunnel first (`ray dashboard cluster/aws.yaml`, or `kubectl port-forward "
                          "svc/fmrilm-head-svc 8265`) and use http://127.0.0.1:8265") from None
    from ray.exceptions import AuthenticationError

    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        given = "RAY_AUTH_TOKEN is set but the cluster refused it" if os.environ.get("RAY_AUTH_TOKEN") else "no token was sent"
        raise SubmitError(f"the Ray cluster at {address} requires its auth token and {given}: export RAY_AUTH_MODE=token and "
                          "RAY_AUTH_TOKEN=<the cluster's token> (cluster/README.md says where to read it)") from None
    except (ConnectionError, RuntimeError) as err:
        raise SubmitError(f"{address} answers but is not a Ray dashboard with the Jobs API: {err}") from None


def project_root(start: str = ".") -> str:
    """The checkout that is uploaded: the nearest folder upwards holding ``pyproject.toml`` and
    ``platform/fmrilm``."""
    here = os.path.abspath(start)
    while True:
        if os.path.isfile(os.path.join(here, "pyproject.toml")) and os.path.isdir(os.path.join(here, "platform", "fmrilm")):
            return here
        parent = os.path.dirname(here)
        if parent == here:
            raise SubmitError("fmrilm submit runs from an fmrilm checkout (a folder with pyproject.toml and platform/fmrilm)")
        here = parent


def run_name(spec) -> str:
    """The run name a spec writes under: ``run.name``, else ``name``, else its kind."""
    run = getattr(spec, "run", None)
    return getattr(run, "name", None) or getattr(spec, "name", None) or spec.kind


def local_paths(data, prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted key, value)`` of every local path in a dumped spec (lists as whole values)."""
    found: list[tuple[str, str]] = []
    if isinstance(data, dict):
        for k, v in data.items():
            found += local_paths(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}")
    elif isinstance(data, list):
        if any(isinstance(v, str) and storage.is_local_path(v) for v in data):
            found.append((prefix, data))
    elif isinstance(data, str) and storage.is_local_path(data):
        found.append((prefix, data))
    return found


def _excluded(rel: str, patterns: list[str]) -> bool:
    """Whether a checkout-relative path, or any folder it is in, matches one of ``patterns``."""
    import fnmatch

    parts = rel.split("/")
    return any(fnmatch.fnmatch(part, pattern.strip("/").removeprefix("**/")) for part in parts for pattern in patterns) or \
        any(fnmatch.fnmatch(rel, pattern) for pattern in patterns)


def travels(value, root: str) -> bool:
    """Whether a local path (or every one in a list) is uploaded with the job: an existing file or
    folder inside the checkout, outside the excluded folders and credential files (a base spec, a
    dataset card)."""
    if isinstance(value, list):
        return all(travels(v, root) for v in value if isinstance(v, str) and storage.is_local_path(v))
    path = os.path.abspath(os.path.expanduser(value.removeprefix("file://")))
    rel = os.path.relpath(path, root)
    if rel.startswith("..") or not os.path.exists(path):
        return False
    return not _excluded(rel.replace(os.sep, "/"), excludes(root))


def upload_files(root: str, named: list[str] = ()) -> list[str]:
    """Checkout-relative paths of the files a job takes, an allowlist: the checkout's tracked files
    (``git ls-files``; outside git, ``pyproject.toml``, ``README.md`` and what is under ``platform/``,
    ``jobs/`` and ``datasets/``), plus the files and folders the spec names inside the checkout
    (``named``); never a symbolic link or a path matching :data:`EXCLUDES`, :data:`CREDENTIAL_FILES`
    or the ``.gitignore`` (a second line: a tracked ``.env`` stays home too)."""
    import subprocess

    try:
        listed = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached"], capture_output=True, check=True, timeout=60).stdout
        files = [f for f in listed.decode().split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        files = ["pyproject.toml", "README.md"]
        for top in ("platform", "jobs", "datasets"):
            for d, _, names in os.walk(os.path.join(root, top)):
                files += [os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/") for n in names]
    for value in named:
        path = os.path.abspath(os.path.expanduser(value.removeprefix("file://")))
        walk = os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path), [], [os.path.basename(path)])]
        files += [os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/") for d, _, names in walk for n in names]
    patterns = excludes(root)
    keep = []
    for rel in dict.fromkeys(files):
        full = os.path.join(root, rel)
        if not rel.startswith("..") and os.path.isfile(full) and not os.path.islink(full) and not _excluded(rel, patterns):
            keep.append(rel)
    return keep


@contextmanager
def staged_checkout(root: str, files: list[str]):
    """A temporary folder holding copies of ``files`` (relative to ``root``), removed on exit: what
    Ray uploads as the job's ``working_dir``."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fmrilm-submit-") as d:
        for rel in files:
            os.makedirs(os.path.join(d, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(os.path.join(root, rel), os.path.join(d, rel))
        yield d


def path_overrides(spec, address: str, root: str) -> list[str]:
    """Overrides that make a spec's local paths absolute (a cluster on this machine); refuses them
    for a remote cluster, whose workers cannot see this machine's files. Paths to files that travel
    with the job (:func:`travels`) stay as they are: the job runs in the uploaded checkout."""
    import yaml

    found = [(k, v) for k, v in local_paths(spec.model_dump(mode="json")) if _absolute(v) != v and not travels(v, root)]
    if not found:
        return []
    if not is_loopback(address):
        keys = ", ".join(f"{k}={v}" for k, v in found)
        raise SubmitError(f"these keys are local paths, which the cluster at {address} cannot see: {keys}. Point them at "
                          "object storage, e.g. run.storage=s3://BUCKET/fmrilm/runs data.root=s3://BUCKET/fmrilm/datasets")

    return [f"{k}={yaml.safe_dump(_absolute(v), default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in found]


def _absolute(value):
    """A local path (or each in a list) made absolute; anything else unchanged."""
    if isinstance(value, list):
        return [_absolute(v) for v in value]
    return storage.absolute(value) if isinstance(value, str) and storage.is_local_path(value) else value


def excludes(root: str) -> list[str]:
    """What the upload leaves out: :data:`EXCLUDES`, :data:`CREDENTIAL_FILES` and the checkout's
    ``.gitignore`` patterns."""
    return list(dict.fromkeys([*EXCLUDES, *CREDENTIAL_FILES, *gitignore_patterns(root)]))


def runtime_env(staged: str, env_vars: dict[str, str]) -> dict:
    """The job's runtime environment: the staged checkout (:func:`staged_checkout` of
    :func:`upload_files`), the fmrilm package from it on every worker, and only the named
    environment variables."""
    return {"working_dir": staged, "py_modules": [os.path.join(staged, "platform", "fmrilm")], "env_vars": dict(env_vars)}


def entrypoint(spec_path: str, overrides: list[str]) -> str:
    """The command the job runs: the same ``fmrilm run`` as locally."""
    return shlex.join(["python", "-m", "fmrilm", "run", spec_path, *overrides])


def submit(spec_uri: str, overrides: list[str], address: str | None = None, name: str | None = None) -> dict:
    """Validate and submit a job spec; returns ``{"id", "address", "entrypoint", "resubmitted"}``."""
    from fmrilm.registry import load_job

    spec, _, submit_spec = load_job(spec_uri, overrides)
    env_vars = check_env(submit_spec.env)
    root = project_root()
    spec_path = os.path.relpath(os.path.abspath(spec_uri), root)
    if spec_path.startswith(".."):
        raise SubmitError(f"{spec_uri} is outside the checkout that is uploaded ({root}); keep job specs in jobs/")
    address = resolve_address(address)
    client = connect(address)
    run = name or run_name(spec)
    previous = attempts(client, run)
    if previous and str(previous[-1].status) not in TERMINAL:
        raise SubmitError(f"run {run} is already {previous[-1].status} on {address} ({previous[-1].submission_id}): follow it "
                          f"with `fmrilm logs {run} --follow`, or `fmrilm stop {run}` first")
    taken = {j.submission_id for j in previous}
    job_id = run if run not in taken else next(f"{run}.{i}" for i in range(len(taken) + 1, 10**6) if f"{run}.{i}" not in taken)
    command = entrypoint(spec_path, [*overrides, *path_overrides(spec, address, root)])
    named = [spec_uri] + [p for _, v in local_paths(spec.model_dump(mode="json")) for p in (v if isinstance(v, list) else [v])
                          if isinstance(p, str) and storage.is_local_path(p) and travels(p, root)]
    with staged_checkout(root, upload_files(root, named)) as staged:  # Ray packs and uploads it before submit_job returns
        client.submit_job(entrypoint=command, submission_id=job_id, runtime_env=runtime_env(staged, env_vars),
                          entrypoint_num_cpus=submit_spec.entrypoint_num_cpus or None,
                          metadata={"fmrilm_run": run, "fmrilm_spec": spec_path, "fmrilm_kind": spec.kind})
    return {"id": job_id, "run": run, "address": address, "entrypoint": command, "resubmitted": bool(previous)}


def attempts(client, run: str) -> list:
    """The jobs of a run name, oldest first."""
    jobs = [j for j in client.list_jobs() if (j.metadata or {}).get("fmrilm_run") == run or j.submission_id == run]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def job_info(name: str, address: str | None = None, client=None):
    """The Ray ``JobDetails`` of a run's newest attempt (or of one exact submission id)."""
    client = client or connect(address)
    jobs = attempts(client, name) or [j for j in client.list_jobs() if j.submission_id == name]
    if not jobs:
        raise SubmitError(f"no job {name!r} on {resolve_address(address)} (`fmrilm status` lists them)")
    return jobs[-1]


def list_jobs(address: str | None = None) -> list:
    """Every job the cluster knows, newest first."""
    return sorted(connect(address).list_jobs(), key=lambda j: j.start_time or 0, reverse=True)


def logs(name: str, address: str | None = None) -> str:
    """The whole log so far of a run's newest attempt."""
    client = connect(address)
    return client.get_job_logs(job_info(name, client=client).submission_id)


# what a run's log says about its recoveries (fmrilm.train.trainer and the loops write these lines)
RECOVERY_MARKERS = ("the cluster lost", "resumed at step")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def recoveries(log: str) -> list[str]:
    """The lines of a run's log that say it lost nodes or resumed from a checkpoint, once each,
    without the Ray worker prefix or colour codes."""
    out: list[str] = []
    for line in log.splitlines():
        line = re.sub(r"^\([^)]*\)\s*", "", _ANSI.sub("", line)).strip()
        if any(m in line for m in RECOVERY_MARKERS) and line not in out:
            out.append(line)
    return out


def follow(name: str, address: str | None = None, write=print) -> str:
    """Stream the log of a run's newest attempt to ``write`` until it ends; returns the final status."""
    import asyncio

    client = connect(address)
    job_id = job_info(name, client=client).submission_id

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            write(lines.rstrip("\n"))

    asyncio.run(tail())
    return wait(job_id, timeout_s=30, client=client)


def stop(name: str, address: str | None = None, wait_s: float = 60.0) -> str:
    """Ask a run's newest attempt to stop and wait (up to ``wait_s``) until it has; returns its status."""
    client = connect(address)
    info = job_info(name, client=client)
    if str(info.status) not in TERMINAL:
        client.stop_job(info.submission_id)
    return wait(info.submission_id, timeout_s=wait_s, client=client)


def wait(name: str, address: str | None = None, timeout_s: float = 600.0, client=None) -> str:
    """Poll until a run's newest attempt is SUCCEEDED, FAILED or STOPPED (or ``timeout_s``); returns its status."""
    client = client or connect(address)
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(job_info(name, client=client).status)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(1.0)
