"""GPU tests: one local Ray with the GPU for the module (loopback only, as in tests/conftest.py)."""

import pytest


@pytest.fixture(scope="module")
def gpu_ray():
    import ray

    ray.init(num_cpus=8, num_gpus=1, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
