"""Checkpoints that cannot be trusted: a planted pickle payload is refused before anything runs,
a damaged newest checkpoint is skipped for the newest intact one, a resume with a spec of another
model shape or on re-ingested data is refused in one line, and a second driver of a live run is
refused. All through the tokenizer stage on 2 Ray Train workers and the CLI, as a user meets them."""

import os

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fmrilm.cli import app
from fmrilm.data.ingest import ingest_synthetic
from fmrilm.data.synth import SynthParams

pytestmark = pytest.mark.reliability
PARAMS = SynthParams(name="ckpt", subjects=16, n_rois=12, n_networks=4, n_timepoints=64, seed=6)


class Payload:
    """What a hostile checkpoint holds: unpickling it runs a shell command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _spec_file(root, name="ckpt-run", **over) -> str:
    spec = {
        "kind": "tokenizer",
        "data": {"root": str(root / "datasets"), "window": 32, "stride": 32, "split": {"fractions": {"train": 0.75, "val": 0.25}}},
        "model": {"patch": 16, "width": 16, "heads": 2, "depth": 1, "code_dim": 8, "num_codes": 32},
        "train": {"epochs": 4, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "checkpoint_every": 4, "log_every": 2},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "run": {"storage": str(root / "runs"), "name": name, "logger": "none"},
    }
    for key, value in over.items():
        section, leaf = key.split("__")
        spec[section][leaf] = value
    path = root / f"{name}-{len(over)}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _train(spec_file: str, *overrides: str):
    return CliRunner().invoke(app, ["tokenizer", "train", spec_file, *overrides])


def _error(r) -> str:
    """The CLI's own error (its last lines, unwrapped), after any log lines Ray streamed from workers."""
    text = r.output[r.output.rindex("error:"):]
    assert "Traceback" not in text and "pid=" not in text, r.output
    return " ".join(text.split())


def test_untrusted_checkpoints(ray_cluster, tmp_path, monkeypatch):
    ingest_synthetic(PARAMS, str(tmp_path / "datasets"))
    spec = _spec_file(tmp_path)
    run_dir = tmp_path / "runs" / "ckpt-run"
    monkeypatch.setenv("FMRILM_FAULT_STEP", "10")
    r = _train(spec)
    assert r.exit_code != 0 and sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_0")) == [
        "checkpoint_0000004", "checkpoint_0000008"]
    monkeypatch.delenv("FMRILM_FAULT_STEP")
    newest = run_dir / "checkpoint_0000008" / "state.pt"
    good = newest.read_bytes()

    # 1. a planted payload: refused with one line naming the file, and it never ran
    marker = tmp_path / "payload-ran"
    torch.save({"model": Payload(str(marker))}, newest)
    r = _train(spec)
    assert r.exit_code == 2, r.output
    assert "pickles ['posix.system'], which loading would execute: refused" in _error(r) and "state.pt" in _error(r)
    assert not marker.exists()

    # 2. a damaged newest checkpoint: the run resumes from the newest intact one and ends as planned
    newest.write_bytes(good[: len(good) // 3])
    r = _train(spec)
    assert r.exit_code == 0, r.output
    assert "checkpoint_0000008" in r.output and "damaged" in r.output  # says which it skipped
    folders = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_0"))
    assert folders == ["checkpoint_0000008-after-0000008", "checkpoint_0000012-after-0000008"]  # retrained steps never reuse a damaged name

    # 3. the newest checkpoint folder deleted (by hand, or a bucket lifecycle rule): Ray's record is
    # repaired and the run resumes from the newest folder that is left
    import shutil

    shutil.rmtree(run_dir / folders[-1])
    r = _train(spec)
    assert r.exit_code == 0, r.output
    assert "are gone; dropped from Ray's record, resuming from checkpoint_0000008-after-0000008" in " ".join(r.output.split())

    # 4. resuming with a spec of another model shape: one line, not a state-dict traceback
    r = _train(spec, "model.width=24")
    assert r.exit_code == 2 and "another model shape (model.width: 16 in the checkpoint, 24 now)" in _error(r), r.output

    # 5. the datasets re-ingested since the checkpoints: refused unless run.allow_new_data
    ingest_synthetic(PARAMS.model_copy(update={"seed": 7}), str(tmp_path / "datasets"))
    r = _train(spec)
    assert r.exit_code == 2 and "trained on other dataset versions" in _error(r) and "run.allow_new_data=true" in _error(r), r.output
    assert _train(spec, "run.allow_new_data=true").exit_code == 0


def test_a_second_driver_of_a_live_run_is_refused(ray_cluster, tmp_path):
    import json
    import socket
    import time

    ingest_synthetic(PARAMS, str(tmp_path / "datasets"))
    run_dir = tmp_path / "runs" / "busy"
    run_dir.mkdir(parents=True)
    live = subprocess_sleeper()
    try:
        (run_dir / "fmrilm_run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid, "token": "x",
                                                             "heartbeat": time.time()}))
        r = _train(_spec_file(tmp_path, "busy"))
        assert r.exit_code == 2 and "run 'busy' is already running" in _error(r), r.output
    finally:
        live.kill()
        live.wait()
    # its driver gone, the lock is stale and taken over (a SIGKILLed driver never blocks its run)
    r = _train(_spec_file(tmp_path, "busy"), "train.max_steps=2")
    assert r.exit_code == 0, r.output
    assert not (run_dir / "fmrilm_run.lock").exists()


def subprocess_sleeper():
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def test_a_symlink_in_a_checkpoint_is_refused_before_any_pickle_is_read(tmp_path):
    """A payload reached through a symlinked folder ran on resume: the check walked past links."""
    import torch

    from fmrilm.train.checkpoints import check_pickles, UnsafeCheckpoint

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    marker = tmp_path / "ran"
    torch.save({"x": Payload(str(marker))}, elsewhere / "mp_rank_00_model_states.pt")
    ckpt = tmp_path / "checkpoint_0000006"
    ckpt.mkdir()
    torch.save({"w": torch.zeros(2)}, ckpt / "state.pt")
    (ckpt / "ds").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UnsafeCheckpoint, match=r"holds a symbolic link .*ds -> .*elsewhere: refused"):
        check_pickles(str(ckpt))
    (ckpt / "ds").unlink()
    (ckpt / "ds.pt").symlink_to(elsewhere / "mp_rank_00_model_states.pt")
    with pytest.raises(UnsafeCheckpoint, match="symbolic link"):
        check_pickles(str(ckpt))
    assert not marker.exists()


def test_the_driver_refuses_the_newest_checkpoint_before_any_worker_starts(tmp_path):
    """The pickle and shape refusals used to need a Ray Train worker group each (two worker
    start-ups for a one-line answer); the driver checks the newest checkpoint on the store first."""
    import json

    from fmrilm import storage
    from fmrilm.train.checkpoints import SpecMismatch, UnsafeCheckpoint, check_newest_checkpoint

    run = storage.resolve(str(tmp_path / "run"))
    check_newest_checkpoint(run, "r", {"model.width": 16}, frozenset())  # no run yet: nothing to check
    for step, payload in ((4, {"w": torch.zeros(2)}), (8, {"w": torch.zeros(2)})):
        folder = tmp_path / "run" / f"checkpoint_{step:07d}"
        folder.mkdir(parents=True)
        torch.save(payload, folder / "state.pt")
        (folder / "meta.json").write_text(json.dumps({"step": step, "shape": {"model.width": 16}}))
    (tmp_path / "run" / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's record beside the folders
    check_newest_checkpoint(run, "r", {"model.width": 16}, frozenset())
    with pytest.raises(SpecMismatch, match=r"checkpoint_0000008 of run 'r' was written with another model shape \(model.width: 16"):
        check_newest_checkpoint(run, "r", {"model.width": 24}, frozenset())
    newest = tmp_path / "run" / "checkpoint_0000008" / "state.pt"
    good = newest.read_bytes()
    marker = tmp_path / "ran"
    torch.save({"model": Payload(str(marker))}, newest)
    with pytest.raises(UnsafeCheckpoint, match=r"checkpoint_0000008/state.pt pickles \['posix.system'\]"):
        check_newest_checkpoint(run, "r", {"model.width": 16}, frozenset())
    assert not marker.exists()
    newest.write_bytes(good[: len(good) // 3])  # damaged: left to the workers, which fall back to checkpoint_0000004
    check_newest_checkpoint(run, "r", {"model.width": 16}, frozenset())


def test_checkpoints_without_ray_s_record_are_refused_not_overwritten(tmp_path):
    """A run folder whose checkpoint_manager_snapshot.json is gone restarted at step 0 and rotated its checkpoints away."""
    from fmrilm import storage
    from fmrilm.train.run_lock import repair_run_record, RunRecordMissing

    run_dir = tmp_path / "run"
    for step in (2, 4, 6):
        (run_dir / f"checkpoint_{step:07d}").mkdir(parents=True)
    with pytest.raises(RunRecordMissing, match=r"run 'r' has checkpoints \(checkpoint_0000002, checkpoint_0000004, checkpoint_0000006\) "
                                                r"but no Ray record of them .*start a new run.name"):
        repair_run_record(storage.resolve(str(run_dir)), "r")
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint_0000002", "checkpoint_0000004", "checkpoint_0000006"]
    repair_run_record(storage.resolve(str(tmp_path / "fresh")), "r")  # a new run: nothing to refuse
