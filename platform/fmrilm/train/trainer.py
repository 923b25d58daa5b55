"""The one trainer of every stage: a Ray Train ``TorchTrainer`` of a stage's loop on our storage
layer, under the run's lock, with quiet workers and a clear error when its store is unreachable."""

from __future__ import annotations

import logging

from fmrilm import runtime, storage
from fmrilm.train.checkpoints import check_newest_checkpoint
from fmrilm.train.run_lock import RunLock, check_run_inputs, repair_run_record
from fmrilm.train.specs import RunSpec, ScalingSpec

log = logging.getLogger("fmrilm.train")


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


def run_trainer(loop, config: dict, scaling: ScalingSpec, datasets: dict, run: RunSpec, versions: dict | None = None,
                shape: dict | None = None, pickles: frozenset[str] = frozenset()):
    """The one trainer of every stage: a ``TorchTrainer`` of ``loop(config)`` on
    ``scaling.num_workers`` workers over the Ray ``datasets`` (name -> dataset), fitted under the
    run's lock (:class:`RunLock`: one live driver per run name) after :func:`check_run_inputs`
    (``versions``: dataset -> version read) and, with the model ``shape`` its checkpoints record,
    :func:`~fmrilm.train.checkpoints.check_newest_checkpoint` (``pickles``: the globals its
    checkpoint files may hold); returns Ray's ``Result``. When the run's object store
    stopped answering (the error says so, or the run folder cannot be listed afterwards), raise a
    :class:`fmrilm.storage.StorageError` that says so and how to resume, instead of a worker-group
    traceback."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _quiet_worker(loop), train_loop_config=config, datasets=datasets, run_config=run_config(run),
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker},
                                     placement_strategy=scaling.placement_strategy))
    run_dir = storage.resolve(storage.join(run.storage, run.name))
    lock = RunLock(run_dir, run.name).acquire()
    try:
        check_run_inputs(run_dir, run, versions)
        if shape is not None:
            check_newest_checkpoint(run_dir, run.name, shape, pickles)
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


def alive_nodes() -> dict[str, str]:
    """Node id -> address of every live node of the connected Ray cluster."""
    import ray

    return {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}


def lost_nodes(before: dict[str, str]) -> list[str]:
    """The nodes of ``before`` (:func:`alive_nodes`) that are no longer alive, as ``id-prefix (address)``."""
    try:
        now = alive_nodes()
    except Exception:  # noqa: BLE001 - a report, never a reason to fail
        return []
    return [f"{node_id[:8]} ({address})" for node_id, address in before.items() if node_id not in now]


def _fit(trainer, run: RunSpec):
    """``trainer.fit()``; says which nodes the cluster lost during it (the run recovered when
    ``run.max_failures`` allowed, else it stopped and a re-run resumes)."""
    before = alive_nodes()
    try:
        result = trainer.fit()
    except Exception as err:
        lost = lost_nodes(before)
        if lost:
            log.error("run %r: the cluster lost %d node(s) during the run: %s. Re-run (or re-submit) the same spec to resume "
                      "from the newest checkpoint; with run.max_failures=N (> 0) the run recovers by itself on the nodes left",
                      run.name, len(lost), ", ".join(lost))
        _raise_if_store_unreachable(err, run)
        raise
    lost = lost_nodes(before)
    if lost:
        log.warning("run %r: the cluster lost %d node(s) during the run (%s); the workers restarted on the nodes left and "
                    "resumed from the newest checkpoint", run.name, len(lost), ", ".join(lost))
    return result


def _raise_if_store_unreachable(err: Exception, run: RunSpec) -> None:
    """Raise a :class:`fmrilm.storage.StorageError` when ``err`` came from the run's object store
    going away; return otherwise."""
    if not storage.is_remote(run.storage):
        return
    reason = next((ln.strip() for ln in reversed(str(err).splitlines()) if storage.unreachable(ln)), None)
    if reason is None:
        try:
            storage.list_dir(storage.resolve(storage.join(run.storage, run.name)))
        except storage.StorageError as probe:
            reason = str(probe) if storage.unreachable(probe) else None
    if reason is None:
        return
    raise storage.StorageError(
        f"run {run.name!r} stopped: its storage {run.storage} is unreachable ({reason}). Checkpoints registered "
        "before the outage are kept: re-run the same command once the store answers to resume from the newest.") from err
