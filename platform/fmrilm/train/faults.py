"""Fault injection for the reliability suite: ``FMRILM_FAULT_STEP=N`` raises at step N of a
training loop, ``kill:N`` SIGKILLs the worker there, ``hold:N`` holds every worker there for
``FMRILM_FAULT_HOLD_S`` seconds (default 120: time for a test to take a node away); each once,
not again after the resume."""

from __future__ import annotations

import os
import time


FAULT_ENV = "FMRILM_FAULT_STEP"
HOLD_ENV = "FMRILM_FAULT_HOLD_S"
KINDS = ("raise", "kill", "hold")


def fault_plan() -> dict | None:
    """Fault injection for the reliability tests, read on the driver from ``FMRILM_FAULT_STEP``:
    ``"6"`` raises in every worker at step 6, ``"kill:6"`` SIGKILLs the last rank's process at
    step 6 (a worker lost mid-run), ``"hold:6"`` holds every worker at step 6 for
    ``FMRILM_FAULT_HOLD_S`` seconds. Returns ``{"kind", "step", "hold_s"}`` or None when unset."""
    value = os.environ.get(FAULT_ENV, "").strip()
    if not value:
        return None
    kind, _, step = value.rpartition(":")
    kind = kind or "raise"
    if kind not in KINDS or not step.isdigit() or int(step) < 1:
        raise ValueError(f"{FAULT_ENV}={value!r}: expected STEP, kill:STEP or hold:STEP (STEP >= 1)")
    return {"kind": kind, "step": int(step), "hold_s": float(os.environ.get(HOLD_ENV, "120"))}


def inject_fault(plan: dict | None, step: int, resumed: bool) -> None:
    """Carry out :func:`fault_plan`'s fault at its step, once: never in a run that resumed from a
    checkpoint (the retry after the fault). A kill waits out one Ray Train health-check interval
    first: the controller collects reports (and so registers checkpoints) when it polls the
    workers, and a worker that dies between a report and the next poll loses that report too."""
    if not plan or resumed or step != plan["step"]:
        return
    if plan["kind"] == "raise":
        raise RuntimeError(f"injected fault at step {step} ({FAULT_ENV})")
    if plan["kind"] == "hold":
        time.sleep(plan.get("hold_s", 120))
        return
    import ray.train

    ctx = ray.train.get_context()
    if ctx.get_world_rank() == ctx.get_world_size() - 1:
        import signal

        time.sleep(1.5 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")) + 0.5)
        os.kill(os.getpid(), signal.SIGKILL)
