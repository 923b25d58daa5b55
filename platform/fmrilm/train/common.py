"""What every training stage shares: scaling/run specs, LR schedule, checkpoints, metric logs."""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import Field

from fmrilm import runtime, storage
from fmrilm.config import Strict


class ScalingSpec(Strict):
    """Ray Train workers. On this 2-core machine keep cpus_per_worker fractional (STACK_NOTES)."""

    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False


class RunSpec(Strict):
    """Where a run lives: ``<storage>/<name>/`` (re-running the same name resumes)."""

    storage: str = "./fmrilm-data/runs"
    name: str = Field("tokenizer", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    max_failures: int = Field(0, ge=-1, description="worker failures to recover from (-1: unlimited)")
    keep_checkpoints: int = Field(2, ge=1)
    logger: Literal["tensorboard", "none"] = "tensorboard"
    log_dir: str = Field("./fmrilm-data/tensorboard", description="local folder for TensorBoard event files")


class OptimSpec(Strict):
    """AdamW with linear warm-up then cosine decay."""

    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints (and validations)")
    log_every: int = Field(10, ge=1, description="steps between metric reports")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps in total")
    seed: int = 0


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def worker_spec(spec) -> dict:
    """A spec as the dict Ray workers rebuild it from, local paths made absolute: a worker's
    working directory is not the driver's, so ``./fmrilm-data/...`` would land elsewhere (what
    counts as a local path: :func:`fmrilm.storage.is_local_path`)."""
    def fix(value):
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, str) and storage.is_local_path(value):
            return storage.absolute(value)
        return value

    return fix(spec.model_dump(mode="json"))


def run_config(run: RunSpec):
    """Ray Train ``RunConfig`` on our storage layer (any URI), with failure recovery, workers seeing
    this process's storage settings (:func:`fmrilm.runtime.forwarded_env`); inside a Ray
    Tune trial it also forwards every report to Tune (``TuneReportCallback``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    loc = storage.resolve(run.storage)
    storage.makedirs(loc)
    callbacks = []
    if _in_tune_session():
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    return RunConfig(name=run.name, storage_path=loc.path, storage_filesystem=loc.fs,
                     failure_config=FailureConfig(max_failures=run.max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints), callbacks=callbacks,
                     # workers write exports through our storage layer: the same endpoint as this process
                     worker_runtime_env={"env_vars": runtime.forwarded_env()})


FAULT_ENV = "FMRILM_FAULT_STEP"


def fault_plan() -> dict | None:
    """Fault injection for the reliability tests, read on the driver from ``FMRILM_FAULT_STEP``:
    ``"6"`` raises in every worker at step 6, ``"kill:6"`` SIGKILLs the last rank's process at
    step 6 (a worker lost mid-run). Returns ``{"kind", "step"}`` or None when unset."""
    value = os.environ.get(FAULT_ENV, "").strip()
    if not value:
        return None
    kind, _, step = value.rpartition(":")
    kind = kind or "raise"
    if kind not in ("raise", "kill") or not step.isdigit() or int(step) < 1:
        raise ValueError(f"{FAULT_ENV}={value!r}: expected STEP or kill:STEP (STEP >= 1)")
    return {"kind": kind, "step": int(step)}


def inject_fault(plan: dict | None, step: int, resumed: bool) -> None:
    """Carry out :func:`fault_plan`'s fault at its step, once: never in a run that resumed from a
    checkpoint (the retry after the fault). A kill waits out one Ray Train health-check interval
    first: the controller collects reports (and so registers checkpoints) when it polls the
    workers, and a worker that dies between a report and the next poll loses that report too."""
    if not plan or resumed or step != plan["step"]:
        return
    if plan["kind"] == "raise":
        raise RuntimeError(f"injected fault at step {step} ({FAULT_ENV})")
    import ray.train

    ctx = ray.train.get_context()
    if ctx.get_world_rank() == ctx.get_world_size() - 1:
        import signal
        import time

        time.sleep(1.5 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")) + 0.5)
        os.kill(os.getpid(), signal.SIGKILL)


def run_trainer(trainer, run: RunSpec):
    """``trainer.fit()``. When the run's object store stopped answering (the error says so, or
    the run folder cannot be listed afterwards), raise a :class:`fmrilm.storage.StorageError`
    that says so and how to resume, instead of a worker-group traceback."""
    try:
        return trainer.fit()
    except Exception as err:
        if not storage.is_remote(run.storage):
            raise
        reason = next((ln.strip() for ln in reversed(str(err).splitlines()) if storage.unreachable(ln)), None)
        if reason is None:
            try:
                storage.list_dir(storage.resolve(storage.join(run.storage, run.name)))
            except storage.StorageError as probe:
                reason = str(probe) if storage.unreachable(probe) else None
        if reason is None:
            raise
        raise storage.StorageError(
            f"run {run.name!r} stopped: its storage {run.storage} is unreachable ({reason}). Checkpoints registered "
            "before the outage are kept: re-run the same command once the store answers to resume from the newest.") from err


@contextmanager
def checkpoint_dir():
    """A temporary folder to write a checkpoint into before ``ray.train.report`` uploads it."""
    with tempfile.TemporaryDirectory(prefix="fmrilm-ckpt-") as d:
        yield d


def save_state(directory: str, state: dict, meta: dict) -> None:
    torch.save(state, os.path.join(directory, "state.pt"))
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f)


def load_state(checkpoint) -> tuple[dict, dict]:
    """``(state, meta)`` of a Ray Train checkpoint written by :func:`save_state`."""
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=False)
        with open(os.path.join(d, "meta.json")) as f:
            meta = json.load(f)
    return state, meta


class MetricLog:
    """Rank-0 TensorBoard event files (a no-op elsewhere or when disabled)."""

    def __init__(self, run: RunSpec, rank: int):
        self.writer = None
        if run.logger == "tensorboard" and rank == 0:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run.log_dir, run.name))

    def log(self, metrics: dict, step: int) -> None:
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
