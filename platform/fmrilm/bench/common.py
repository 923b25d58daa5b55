"""What every benchmark shares: machine labels and side-by-side timing."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable


def machine() -> dict:
    """Labels for absolute figures: CPU count, processor, Python, torch and Ray versions."""
    import ray
    import torch

    return {
        "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "ray": ray.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def time_side_by_side(sides: dict[str, Callable[[], dict]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Run each side ``warmup`` times untimed, then ``repeats`` times interleaved (A, B, A, B ...)
    so both see the same machine noise. Each callable returns counters (e.g. rows, bytes);
    returns per side the median seconds, all runs, and the counters of the last run."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    runs: dict[str, list[float]] = {name: [] for name in sides}
    counters: dict[str, dict] = {}
    for _ in range(repeats):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            counters[name] = fn()
            runs[name].append(time.perf_counter() - t0)
    return {name: {"seconds": statistics.median(runs[name]), "runs": runs[name], **counters[name]} for name in sides}
