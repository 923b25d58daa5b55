"""One live driver per run, on any storage: the run lock (``fmrilm_run.lock``, taken
exclusively, refreshed while the run trains, taken over from a driver that is gone), the record
of the dataset versions a run read (``fmrilm_run.json``), and the repair of Ray Train's record of
a run's checkpoints."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid

from fmrilm import storage
from fmrilm.errors import UserError
from fmrilm.train.specs import RunSpec


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
        _LIVE_LOCKS.add(self.me["token"])  # live before it can be written: a thread of this process reading it then sees it held
        try:
            return self._acquire()
        except BaseException:
            _LIVE_LOCKS.discard(self.me["token"])
            raise

    def _acquire(self) -> "RunLock":
        for _ in range(3):
            if storage.create_exclusive(self.loc, self._body()):
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


class RunRecordMissing(UserError):
    """A run folder holds checkpoints but not Ray Train's record of them."""


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
