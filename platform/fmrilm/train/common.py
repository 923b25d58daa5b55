"""What every training stage shares: scaling/run specs, LR schedule, checkpoints, metric logs."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
import socket
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Literal

import pyarrow.fs as pafs
import torch
from pydantic import Field

from fmrilm import runtime, storage
from fmrilm.config import RUN_NAME, RunLocation, Strict
from fmrilm.errors import UserError


class ScalingSpec(Strict):
    """Ray Train workers. On a small machine keep cpus_per_worker fractional: workers that take every CPU leave
    none for the Ray Data read tasks that feed them."""

    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False


class RunSpec(RunLocation):
    """Where a training run lives (``<storage>/<name>/``; the same name resumes) and how it runs."""

    name: str = Field("tokenizer", pattern=RUN_NAME)
    max_failures: int = Field(0, ge=-1, description="worker failures to recover from (-1: unlimited)")
    keep_checkpoints: int = Field(2, ge=1)
    logger: Literal["tensorboard", "none"] = "tensorboard"
    log_dir: str = Field("./fmrilm-data/tensorboard", description="local folder for TensorBoard event files")
    allow_new_data: bool = Field(False, description="resume even though the datasets were re-ingested since the checkpoints were written")


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
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    from fmrilm import console

    loc = storage.resolve(run.storage)
    storage.makedirs(loc)
    callbacks = []
    if _in_tune_session():
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    return RunConfig(name=run.name, storage_path=loc.path, storage_filesystem=loc.fs,
                     failure_config=FailureConfig(max_failures=run.max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints), callbacks=callbacks,
                     logging_config=LoggingConfig(log_level=console.train_log_level()),
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

        time.sleep(1.5 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")) + 0.5)
        os.kill(os.getpid(), signal.SIGKILL)


RUN_RECORD = "fmrilm_run.json"
RUN_LOCK = "fmrilm_run.lock"
LOCK_HEARTBEAT_S = 10.0
LOCK_STALE_S = 60.0
_LIVE_LOCKS: set[str] = set()  # tokens of the run locks this process holds now


class RunBusy(UserError):
    """Another live driver is running a run of the same name."""


class RunInputsChanged(UserError):
    """A run would resume on other dataset versions than its checkpoints were trained on."""


class RunLock:
    """``<run>/fmrilm_run.lock``: created exclusively, refreshed every few seconds by a thread
    while the run trains, removed at the end. A lock whose owner process is gone (same host) or
    whose heartbeat is older than ``LOCK_STALE_S`` was left by a killed driver and is taken over."""

    def __init__(self, run_dir: storage.Location, name: str):
        self.loc, self.name = run_dir.join(RUN_LOCK), name
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="fmrilm-run-lock", daemon=True)

    def _body(self) -> bytes:
        return json.dumps(self.me | {"heartbeat": time.time()}).encode()

    def _stale(self, held: dict) -> bool:
        if held.get("host") == socket.gethostname() and held.get("pid"):
            if int(held["pid"]) == os.getpid():
                return held.get("token") not in _LIVE_LOCKS  # left by an earlier run of this process that could not remove it
            try:
                os.kill(int(held["pid"]), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        return time.time() - float(held.get("heartbeat", 0)) > LOCK_STALE_S

    def acquire(self) -> "RunLock":
        for _ in range(3):
            if storage.create_exclusive(self.loc, self._body()):
                _LIVE_LOCKS.add(self.me["token"])
                self._thread.start()
                return self
            try:
                text = storage.read_text(self.loc)
            except FileNotFoundError:
                continue  # released in between
            try:
                held = json.loads(text)
            except json.JSONDecodeError:  # a damaged lock: stale once as old as a stale one, named by its content
                held = {"token": "unreadable-" + hashlib.sha256(text.encode()).hexdigest()[:12], "heartbeat": storage.modified_at(self.loc)}
            if not self._stale(held):
                raise RunBusy(f"run {self.name!r} is already running (driver {held.get('host')}:{held.get('pid')}, lock "
                              f"{self.loc.uri}): wait for it to finish, stop it, or choose another run.name")
            if storage.take_over(self.loc, str(held.get("token")), self._body()):  # one of several contenders wins
                logging.getLogger("fmrilm.train").warning("run %s: took over the lock of a driver that is gone (%s)", self.name, held)
                storage.drop_takeover_markers(self.loc)
                _LIVE_LOCKS.add(self.me["token"])
                self._thread.start()
                return self
            time.sleep(0.5)
        raise RunBusy(f"run {self.name!r}: could not take its lock {self.loc.uri}; another driver is taking it over")

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                if json.loads(storage.read_text(self.loc)).get("token") != self.me["token"]:
                    return  # taken over (this driver looked gone): never overwrite the new holder's lock
                storage.write_bytes(self.loc, self._body())
            except (storage.StorageError, FileNotFoundError, json.JSONDecodeError):
                pass  # an outage: the run itself reports it

    def release(self) -> None:
        self._stop.set()
        _LIVE_LOCKS.discard(self.me["token"])
        try:
            held = json.loads(storage.read_text(self.loc))
            if held.get("token") == self.me["token"]:
                storage.delete_file(self.loc)
        except (FileNotFoundError, json.JSONDecodeError, storage.StorageError):
            pass


def check_run_inputs(run_dir: storage.Location, run: RunSpec, versions: dict | None) -> None:
    """Record the dataset versions a run reads (``fmrilm_run.json``); when the run already has
    checkpoints trained on other versions, refuse (:class:`RunInputsChanged`) unless
    ``run.allow_new_data``."""
    if versions is None:
        return
    record_loc = run_dir.join(RUN_RECORD)
    try:
        before = json.loads(storage.read_text(record_loc)).get("datasets")
    except (FileNotFoundError, json.JSONDecodeError):
        before = None
    has_checkpoints = any(n.startswith("checkpoint_") for n in storage.list_dir(run_dir))
    if before and has_checkpoints and before != versions:
        changed = ", ".join(f"{k}: {before.get(k)} -> {versions.get(k)}" for k in sorted(set(before) | set(versions))
                            if before.get(k) != versions.get(k))
        if not run.allow_new_data:
            raise RunInputsChanged(f"run {run.name!r} has checkpoints trained on other dataset versions ({changed}): the datasets "
                                   "were re-ingested since. Set run.allow_new_data=true to resume on the new data, or start a new "
                                   "run.name")
        logging.getLogger("fmrilm.train").warning("run %s resumes on new dataset versions (%s): run.allow_new_data", run.name, changed)
    storage.write_text(record_loc, json.dumps({"datasets": versions}, indent=1))


def run_trainer(loop, config: dict, scaling: ScalingSpec, datasets: dict, run: RunSpec, versions: dict | None = None):
    """The one trainer of every stage: a ``TorchTrainer`` of ``loop(config)`` on
    ``scaling.num_workers`` workers over the Ray ``datasets`` (name -> dataset), fitted under the
    run's lock (:class:`RunLock`: one live driver per run name) after :func:`check_run_inputs`
    (``versions``: dataset -> version read); returns Ray's ``Result``. When the run's object store
    stopped answering (the error says so, or the run folder cannot be listed afterwards), raise a
    :class:`fmrilm.storage.StorageError` that says so and how to resume, instead of a worker-group
    traceback."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _quiet_worker(loop), train_loop_config=config, datasets=datasets, run_config=run_config(run),
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker}))
    run_dir = storage.resolve(storage.join(run.storage, run.name))
    lock = RunLock(run_dir, run.name).acquire()
    try:
        check_run_inputs(run_dir, run, versions)
        repair_run_record(run_dir, run.name)
        return _fit(trainer, run)
    finally:
        lock.release()


def _quiet_worker(loop):
    """``loop`` run after :func:`fmrilm.console.worker_setup` in each worker."""
    def worker(config: dict):
        from fmrilm import console

        console.worker_setup()
        return loop(config)

    return worker


def _fit(trainer, run: RunSpec):
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


class UnsafeCheckpoint(UserError):
    """A checkpoint file would run code when loaded (pickled globals outside the allow-list)."""


class CorruptCheckpoint(Exception):
    """A checkpoint cannot be read (truncated, missing files, bad JSON): an older one may be intact."""


class SpecMismatch(UserError):
    """A checkpoint was written by a spec of another shape than the one resuming it."""


class RunRecordMissing(UserError):
    """A run folder holds checkpoints but not Ray Train's record of them."""


class NoIntactCheckpoint(UserError):
    """Every checkpoint of a run is damaged."""


def shape_of(**sections) -> dict:
    """The spec keys that size a model, flattened to dotted keys (``model.width``), for
    :func:`check_shape`. Values are pydantic models, dicts or plain values."""
    out = {}

    def walk(prefix: str, value) -> None:
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = value

    for name, value in sections.items():
        walk(name, value)
    return out


# Globals that DeepSpeed's own checkpoint files pickle besides tensors and containers; anything
# else in a checkpoint is refused before it is loaded (a torch.load with weights_only=False, which
# DeepSpeed uses, would run it).
DEEPSPEED_GLOBALS = frozenset({  # classes only (no callables that could be chained into a call)
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
    "argparse.Namespace", "builtins.set",
})


def check_pickles(directory: str, allowed: frozenset[str] = DEEPSPEED_GLOBALS) -> None:
    """Refuse (:class:`UnsafeCheckpoint`) any ``.pt`` file below ``directory`` that pickles a global
    outside torch's ``weights_only`` set and ``allowed``, and any symbolic link below it (fmrilm
    writes none; a loader that follows one reads files this check never saw); an unreadable file
    is :class:`CorruptCheckpoint`."""
    for root, dirs, files in os.walk(directory):
        for name in sorted(dirs + files):
            path = os.path.join(root, name)
            if os.path.islink(path):
                raise UnsafeCheckpoint(f"checkpoint {directory} holds a symbolic link {path} -> {os.readlink(path)}: refused (a "
                                       "checkpoint is plain files). Delete that checkpoint folder (or the run) if it did not come from fmrilm")
        for name in sorted(files):
            if not name.endswith((".pt", ".pth", ".bin")):
                continue
            path = os.path.join(root, name)
            try:
                unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - set(allowed)
            except Exception as err:  # noqa: BLE001 - any reader failure means the file is damaged
                raise CorruptCheckpoint(f"{name}: unreadable ({type(err).__name__}: {err})") from err
            if unsafe:
                raise UnsafeCheckpoint(f"checkpoint file {path} pickles {sorted(unsafe)}, which loading would execute: refused. "
                                       "Delete that checkpoint folder (or the run) if it did not come from fmrilm")


def save_state(directory: str, state: dict, meta: dict) -> None:
    """``state.pt`` (tensors and plain containers only) and ``meta.json`` into a checkpoint folder."""
    torch.save(state, os.path.join(directory, "state.pt"))
    write_meta(directory, meta)


def write_meta(directory: str, meta: dict) -> None:
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f)


def read_meta(directory: str) -> dict:
    """A checkpoint folder's ``meta.json``; :class:`CorruptCheckpoint` when missing or unreadable."""
    try:
        with open(os.path.join(directory, "meta.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CorruptCheckpoint(f"meta.json: {err}") from err


def check_shape(meta: dict, shape: dict, where: str) -> None:
    """Refuse a checkpoint whose recorded spec ``shape`` (the keys that size the model) differs."""
    saved = meta.get("shape")
    if saved is None or saved == shape:
        return
    diff = sorted(k for k in set(saved) | set(shape) if saved.get(k) != shape.get(k))
    detail = ", ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {shape.get(k)!r} now" for k in diff[:6])
    raise SpecMismatch(f"{where} was written with another model shape ({detail}): resume with the spec it was "
                       "written with, or start a new run (run.name=...)")


def load_state(checkpoint) -> tuple[dict, dict]:
    """``(state, meta)`` of a Ray Train checkpoint written by :func:`save_state`, loaded with
    ``weights_only=True`` after :func:`check_pickles` (nothing in it can execute)."""
    with checkpoint.as_directory() as d:
        meta = read_meta(d)
        check_pickles(d, frozenset())
        try:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - the pickle was checked: a failure here is damage
            raise CorruptCheckpoint(f"state.pt: {type(err).__name__}: {err}") from err
    return state, meta


def resume(load, log_=None):
    """Resume from the newest intact checkpoint of this Ray Train run: calls ``load(checkpoint)``
    on the newest, and when it raises :class:`CorruptCheckpoint` on any rank, every rank moves to
    the next older checkpoint folder of the run (all ranks agree through an all-reduce). Returns
    ``(load's result, checkpoint, name suffix)``, or ``(None, None, "")`` when the run has no
    checkpoint; says which it skipped. After a fall-back the steps after the intact checkpoint
    are trained again, so their checkpoint folders take the suffix (``checkpoint_0000008-after-0000008``)
    rather than the damaged folders' names. :class:`UnsafeCheckpoint` and :class:`SpecMismatch`
    are raised, not skipped."""
    import ray.train

    newest = ray.train.get_checkpoint()
    if newest is None:
        return None, None, ""
    for ckpt in _candidates(newest):
        try:
            value, ok = load(ckpt), 1.0
        except CorruptCheckpoint as err:
            value, ok = err, 0.0
        if _all_ranks_min(ok) == 1.0:
            suffix = "" if ckpt is newest else "-after-" + posixpath.basename(newest.path.rstrip("/")).removeprefix("checkpoint_")
            return value, ckpt, suffix
        (log_ or logging.getLogger("fmrilm.train")).warning(
            "checkpoint %s is damaged (%s): skipped, trying the next older one", ckpt.path, value if not ok else "on another rank")
    raise NoIntactCheckpoint(f"no intact checkpoint in {posixpath.dirname(newest.path)}: every checkpoint folder is damaged; "
                               "delete the run folder to start over")


def checkpoint_name(step: int, suffix: str = "") -> str:
    """The folder name of the checkpoint at ``step`` (sortable by step; see :func:`resume` for ``suffix``)."""
    return f"checkpoint_{step:07d}{suffix}"


def repair_run_record(run_dir: storage.Location, name: str) -> None:
    """Drop from Ray Train's record of a run (``checkpoint_manager_snapshot.json``) the checkpoints
    whose folders are gone (deleted by hand or by a bucket lifecycle rule), so the run resumes
    from the newest one that is still there instead of Ray refusing the whole run folder. Says
    which it dropped. A record it cannot read as Ray 2.60 writes it is left alone; a missing
    record beside checkpoint folders is :class:`RunRecordMissing` (never a silent restart)."""
    import ray

    snap_loc = run_dir.join("checkpoint_manager_snapshot.json")
    try:
        snap = json.loads(storage.read_text(snap_loc))
    except FileNotFoundError:
        orphans = [n for n in storage.list_dir(run_dir) if n.startswith("checkpoint_")]
        if orphans:  # Ray would start from step 0 and rotate these away
            raise RunRecordMissing(f"run {name!r} has checkpoints ({', '.join(orphans[-3:])}{', ...' if len(orphans) > 3 else ''}) but "
                                   f"no Ray record of them ({snap_loc.uri} is missing), so it would start again from step 0 and "
                                   "overwrite them: restore that file, move the checkpoint folders away, or start a new run.name")
        return
    except json.JSONDecodeError:
        return
    needed = {"checkpoint_results", "checkpoint_report_indices", "latest_checkpoint_result", "pending_training_results",
              "pending_validation_specs"}
    if snap.get("ray_version") != ray.__version__ or not needed <= set(snap):
        return
    present = set(storage.list_dir(run_dir))
    gone = {r["checkpoint_dir_name"] for r in snap["checkpoint_results"]} - present
    if not gone:
        return
    kept = [(r, i) for r, i in zip(snap["checkpoint_results"], snap["checkpoint_report_indices"]) if r["checkpoint_dir_name"] not in gone]
    snap["checkpoint_results"], snap["checkpoint_report_indices"] = [r for r, _ in kept], [i for _, i in kept]
    pending = [(r, v) for r, v in zip(snap["pending_training_results"], snap["pending_validation_specs"]) if r["checkpoint_dir_name"] not in gone]
    snap["pending_training_results"], snap["pending_validation_specs"] = [r for r, _ in pending], [v for _, v in pending]
    latest = snap.get("latest_checkpoint_result")
    if latest and latest["checkpoint_dir_name"] in gone:
        snap["latest_checkpoint_result"] = max(kept, key=lambda ri: ri[1])[0] if kept else None
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names", "failed_validation_checkpoint_dir_names"):
        snap[key] = [n for n in snap.get(key, []) if n not in gone]
    storage.write_text(snap_loc, json.dumps(snap))
    newest = snap["latest_checkpoint_result"]["checkpoint_dir_name"] if snap.get("latest_checkpoint_result") else "none (starts over)"
    logging.getLogger("fmrilm.train").warning("run %s: checkpoint folder(s) %s are gone; dropped from Ray's record, resuming from %s",
                                              name, ", ".join(sorted(gone)), newest)


def _candidates(newest):
    """The newest checkpoint, then the run's older ``checkpoint_*`` folders, newest first."""
    from ray.train import Checkpoint

    yield newest
    parent, name = posixpath.split(newest.path.rstrip("/"))
    try:
        names = [i.base_name for i in newest.filesystem.get_file_info(pafs.FileSelector(parent)) if i.type == pafs.FileType.Directory]
    except OSError:
        return
    for older in sorted((n for n in names if n.startswith("checkpoint_") and n < name), reverse=True):
        yield Checkpoint(posixpath.join(parent, older), filesystem=newest.filesystem)


def _all_ranks_min(value: float) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


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
