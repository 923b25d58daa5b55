"""Ray runtime: connect to a cluster or start a safe local one, and run work in parallel.

Local defaults: every Ray listener and the torch/gloo sockets
stay on loopback, and tasks leave CPU for Ray Data.
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Callable, Iterable, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

log = logging.getLogger("fmrilm")
T = TypeVar("T")
R = TypeVar("R")

from fmrilm import LOOPBACK_ENV
# Only these variables travel to workers through runtime_env: endpoints, regions and console
# settings, never keys.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "GLOO_SOCKET_IFNAME", "FMRILM_CACHE", "FMRILM_S3_MAX_ATTEMPTS", "FMRILM_S3_CONNECT_TIMEOUT", "FMRILM_S3_REQUEST_TIMEOUT",
                 "FMRILM_S3_BUCKETS", "FMRILM_VERBOSE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY",
                 "TRANSFORMERS_NO_ADVISORY_WARNINGS", "RAY_DATA_LOG_LEVEL", "PYTHONWARNINGS",
                 "RAY_TRAIN_ENABLE_PRINT_PATCH")


def forwarded_env() -> dict[str, str]:
    """The non-secret environment variables workers need (object-store endpoint, region)."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def root_cause(err: BaseException) -> BaseException:
    """The exception a Ray task raised, unwrapped from ``RayTaskError`` (else ``err`` itself)."""
    seen = 0
    while getattr(err, "cause", None) is not None and seen < 8:  # RayTaskError.cause
        err, seen = err.cause, seen + 1
    return err


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local loopback-only Ray.

    A no-op when Ray is already initialised in this process. Ray's own log lines go through
    fmrilm's logging (:mod:`fmrilm.console`); workers' output reaches this console, quieted at
    its sources (Ray Train's and Ray Data's INFO lines, library warnings). A local Ray gets its dashboard on a free port of
    127.0.0.1: Ray Train's placement-group cleaner asks the State API (served by it) every
    second whether the controller is alive; without it, it logs a warning each time, and with
    another local Ray's dashboard it removes a live run's workers.
    """
    import ray

    from fmrilm import console

    if ray.is_initialized():
        return
    _quiet_ray_data()
    console.route_ray_logs()
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:  # also set when fmrilm is imported, before Ray reads it (see fmrilm/__init__.py)
        for key, value in LOOPBACK_ENV.items():
            os.environ.setdefault(key, value)
    dashboard = {}
    if not address:
        port = free_port()
        # workers inherit this: Ray Train's cleaner then asks this cluster's State API, never the
        # one of another local Ray on the machine (whose answer "no such actor" removes our workers)
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        dashboard = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}
        # Ray Train's spot-preemption watcher has nothing to watch on one machine, and its actor's start logs a core-worker error
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        if not glob.glob("/dev/nvidia[0-9]*"):  # no GPU here: DeepSpeed's CPU accelerator, named (it warns when it falls back to it)
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    env = {k: v for k, v in forwarded_env().items() if k not in _job_env()}  # Ray refuses a key set twice
    ctx = ray.init(
        address=address or "local",  # "local": a new instance, never the one a stale /tmp/ray/ray_current_cluster names
        num_cpus=None if address else (num_cpus or max(4, os.cpu_count() or 1)),
        **dashboard,
        runtime_env={"env_vars": env} if env else None,
        log_to_driver=True,  # fmrilm's lines in workers (resumed at step N, ...) reach the console and the job's log
        logging_level=logging.INFO,
        configure_logging=True,
    )
    session = getattr(ctx, "address_info", {}).get("session_dir")
    console.announce_logs(os.path.join(session, "logs") if session and not address else None)


def _job_env() -> dict:
    """The env_vars of the Ray job this driver runs as (``fmrilm submit``: the spec's ``submit.env``),
    else empty: ``ray.init`` merges its runtime env into the job's and refuses a variable set in both."""
    import json

    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")  # set by Ray's job supervisor
    except json.JSONDecodeError:
        return {}
    return ((config.get("runtime_env") or {}).get("env_vars")) or {}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _quiet_ray_data() -> None:
    """Our own progress bars report long work; Ray Data's per-operator bars and INFO lines
    would drown them. (Ray's logs stay in /tmp/ray/session_*/logs.)"""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def progress() -> Progress:
    """A rich progress bar with count and elapsed time."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=False)


def parallel_map(fn: Callable[[T], R], items: Iterable[T], description: str, use_ray: bool = True, num_cpus: float = 1) -> list[R]:
    """Apply ``fn`` to each item (as Ray tasks when ``use_ray``), with a progress bar.

    Results come back in input order. Exceptions raised by ``fn`` propagate.
    """
    items = list(items)
    results: list = [None] * len(items)
    with progress() as bar:
        task = bar.add_task(description, total=len(items))
        if not use_ray:
            for i, item in enumerate(items):
                results[i] = fn(item)
                bar.advance(task)
            return results
        import ray

        init_ray()
        # tasks see this process's storage settings (endpoint, region), whatever the cluster had
        remote = ray.remote(num_cpus=num_cpus, max_retries=2)(fn).options(runtime_env={"env_vars": forwarded_env()})
        pending = {remote.remote(item): i for i, item in enumerate(items)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                results[pending.pop(ref)] = ray.get(ref)
                bar.advance(task)
    return results


def data_map(fn: Callable[[dict], dict], items: list[dict], description: str, use_ray: bool = True, num_cpus: float = 1) -> list[dict]:
    """Apply ``fn`` to each item as a Ray Data map (one block per item), with a progress bar.

    Items and results are flat dicts of Arrow-friendly values (strings, numbers). Without
    ``use_ray`` the same function runs inline. Results come back in completion order.
    """
    if not use_ray:
        return parallel_map(fn, items, description, use_ray=False)
    import ray

    init_ray()
    results = []
    with progress() as bar:
        task = bar.add_task(description, total=len(items))
        if not items:
            return results
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map(
            fn, num_cpus=num_cpus, runtime_env={"env_vars": forwarded_env()})
        for row in ds.iter_rows():
            results.append(dict(row))
            bar.advance(task)
    return results
