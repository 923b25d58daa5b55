"""Checkpoints that load without running code: what a checkpoint folder holds (``state.pt``,
``meta.json``, DeepSpeed's files), the pickle and link checks made before any file is loaded, the
model-shape check, and resuming from the newest intact checkpoint (all ranks agreeing)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import re
import tempfile
from contextlib import contextmanager

import pyarrow.fs as pafs
import torch

from fmrilm.errors import UserError


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


class NoIntactCheckpoint(UserError):
    """Every checkpoint of a run is damaged."""


def shape_of(**sections) -> dict:
    """The spec keys that size a model, flattened to dotted keys (``model.width``), for
    :func:`check_shape`. Values are pydantic models, dataclasses, dicts or plain values."""
    out = {}

    def walk(prefix: str, value) -> None:
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        elif hasattr(value, "model_dump"):
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


def check_newest_checkpoint(run_dir, run_name: str, shape: dict, allowed: frozenset[str]) -> None:
    """The driver's check before any worker starts, so a run that cannot resume fails in seconds
    with one line: the newest ``checkpoint_*`` folder of the run at ``run_dir`` (a storage
    Location) must record the same model ``shape`` (:func:`check_shape`) and hold no ``.pt`` file
    that pickles a global outside torch's ``weights_only`` set and ``allowed`` (read from the
    store without downloading the tensors). A damaged or unreadable file is left to the workers,
    which fall back to an older checkpoint (:func:`resume`); they check everything again as they load."""
    from fmrilm import storage

    folders = sorted(n for n in storage.list_dir(run_dir) if re.fullmatch(r"checkpoint_\d+(-after-\d+)?", n))  # not Ray's snapshot file
    newest = folders[-1] if folders else None
    if newest is None:
        return
    folder = run_dir.join(newest)
    try:
        meta = json.loads(storage.read_text(folder.join("meta.json")))
    except (FileNotFoundError, ValueError):
        meta = {}
    check_shape(meta, shape, f"checkpoint {folder.uri} of run {run_name!r}")
    infos = folder.fs.get_file_info(pafs.FileSelector(folder.path, recursive=True, allow_not_found=True))
    for info in sorted((i for i in infos if i.type == pafs.FileType.File and i.path.endswith((".pt", ".pth", ".bin"))), key=lambda i: i.path):
        try:
            with folder.fs.open_input_file(info.path) as f:
                unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(f)) - set(allowed)
        except Exception:  # noqa: BLE001 - damage: the workers skip this checkpoint
            continue
        if unsafe:
            raise UnsafeCheckpoint(f"checkpoint file {storage.join(folder.uri, posixpath.relpath(info.path, folder.path))} pickles "
                                   f"{sorted(unsafe)}, which loading would execute: refused. Delete that checkpoint folder (or the run) "
                                   "if it did not come from fmrilm")


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
