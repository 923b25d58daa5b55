"""The shared DeepSpeed loop of the LM stages (pretrain, instruct) on a Ray Train worker:
optimizer and schedule, resume from the run's newest checkpoint, per-objective losses, validation,
checkpoints on every rank, and the export protocol (ZeRO-3 gathers) that hands the model files to
:func:`fmrilm.artifacts.lm.write_folder`."""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Protocol

import numpy as np
import torch

from fmrilm import console
from fmrilm.models.fmri_lm import FMRIInputLM, forward_loss, probe_logits
from fmrilm.models.lora import LoraSpec
from fmrilm.models.number_loss import NumberObjective
from fmrilm.ranks import mean_across_ranks
from fmrilm.train.checkpoints import check_pickles, check_shape, checkpoint_name, CorruptCheckpoint, read_meta, resume, write_meta
from fmrilm.train.faults import inject_fault
from fmrilm.train.optim import OptimSpec, cosine_schedule
from fmrilm.train.specs import RunSpec, ScalingSpec
from fmrilm.train.steps import Running, Steps
from fmrilm.train.deepspeed import DeepSpeedSpec, adamw, autocast, build_config, resolve_precision

log = logging.getLogger("fmrilm.lm")


def peak_memory(on_gpu: bool) -> dict[str, float]:
    """Peak resident memory of this process (MiB) and, on a GPU, peak allocated GPU memory."""
    import resource

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if on_gpu:
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def packed_collate():
    """Ray Data collate: packed numpy rows -> torch tensors."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class PackedCollate(NumpyBatchCollateFn):
        def __call__(self, batch):
            return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}

    return PackedCollate()


@torch.no_grad()
def validation_losses(engine, shard, micro_batch: int, objectives: tuple[str, ...], weights: dict[int, float], device,
                      number: NumberObjective | None = None, precision: str = "fp32", loss_fn=forward_loss) -> dict[str, float]:
    """Mean loss and loss per objective over a (rank's) validation shard, averaged across ranks,
    as ``val/loss`` and ``val/loss/<objective>``; every rank takes part (ZeRO-3 gathers)."""
    from fmrilm.data.pipeline import torch_batches

    keys = ("loss", *(f"loss/{o}" for o in objectives))
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    engine.eval()
    for batch in torch_batches(shard, micro_batch, collate_fn=packed_collate()):
        if not (batch["targets"] != -100).any():
            continue  # padding rows only
        with autocast(precision, device):
            loss, parts = loss_fn(engine, {k: v.to(device) for k, v in batch.items()}, weights, number)
        for k, v in {"loss": loss, **{f"loss/{objectives[i]}": p for i, p in parts.items()}}.items():
            sums[k] = sums.get(k, 0.0) + v.item()
            counts[k] = counts.get(k, 0.0) + 1
    engine.train()
    return {f"val/{k}": v for k, v in mean_across_ranks(sums, counts, keys, device).items()}


class LMRecipeSpec(Protocol):
    """What the shared loop reads of a pretrain or instruct spec."""

    train: OptimSpec
    deepspeed: DeepSpeedSpec
    lora: LoraSpec
    scaling: ScalingSpec
    run: RunSpec


def deepspeed_train(spec: LMRecipeSpec, model, config: dict, objectives: tuple[str, ...], weights: dict[int, float], static: dict,
                    shape: dict, number: NumberObjective | None = None, loss_fn=forward_loss):
    """The shared DeepSpeed loop of the LM stages on a Ray Train worker: optimizer and cosine
    schedule over the ``train`` dataset shard, resume from the run's newest checkpoint (refused
    when its recorded ``shape``, :func:`~fmrilm.train.checkpoints.shape_of` of the keys that size
    the model, differs), the mean loss and one loss per objective name reported every
    ``log_every`` steps (plus ``static``), a checkpoint every ``checkpoint_every`` steps and at the
    end, with the losses over the ``val`` dataset shard at each checkpoint when
    ``config["has_val"]``; ``number`` adds the number-token loss (reported as
    ``loss/<objectives[number.part]>``). ``loss_fn(engine, batch, weights, number) -> (loss,
    {objective id: loss})`` reads a batch (default: packed rows through
    :func:`~fmrilm.models.fmri_lm.forward_loss`). Returns the DeepSpeed engine after the last step."""
    import deepspeed
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = spec.scaling.use_gpu and torch.cuda.is_available()
    keys = ("loss", *(f"loss/{o}" for o in objectives))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, spec.train.lr, spec.train.weight_decay, on_gpu)
    steps = Steps.plan(config["rows_per_rank"], spec.deepspeed.micro_batch_size * spec.deepspeed.grad_accum, spec.train)
    sched = cosine_schedule(opt, spec.train.warmup_steps, steps.total)
    ds_config = build_config(spec.deepspeed, world, spec.train.grad_clip, on_gpu)
    precision = resolve_precision(spec.deepspeed, on_gpu)
    with console.library_prints("deepspeed"):
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config, dist_init_required=False)
    if spec.deepspeed.compile:
        engine.compile()
    device = engine.device
    pin = on_gpu and spec.deepspeed.pin_memory
    resumed = {}

    def load(ckpt):
        with ckpt.as_directory() as d:
            check_shape(read_meta(d), shape, f"checkpoint {ckpt.path} of run {spec.run.name!r}")
            check_pickles(d)
            try:
                _, client = engine.load_checkpoint(d, tag="ds", load_module_strict=not spec.lora.enabled)
            except Exception as err:  # noqa: BLE001 - the files were checked as safe: a failure here is damage
                raise CorruptCheckpoint(f"DeepSpeed state: {type(err).__name__}: {err}") from err
        if client is None or "step" not in client:
            raise CorruptCheckpoint("DeepSpeed found no state to load")
        return client

    client, ckpt, suffix = resume(load, log)
    if client is not None:
        steps.done = int(client["step"])
        resumed = {"resumed_from_step": steps.done}
        if rank == 0:
            log.info("resumed at step %d from %s", steps.done, ckpt.path)
    shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config.get("has_val") else None
    running = Running()
    tokens_done, seconds, waited, pending_wait = 0, 0.0, 0.0, 0.0
    first: dict[str, float] = {}

    def report(final: bool = False) -> None:
        metrics = mean_across_ranks(running.sums, running.counts, keys, device)
        if not first and "loss" in metrics:
            first["first_loss"] = metrics["loss"]  # the mean over the first log interval, to see the fall
        metrics |= first
        metrics |= resumed | {"step": steps.done, "epoch": steps.epoch, "lr": sched.get_last_lr()[0],
                              "tokens_per_s": tokens_done / seconds if seconds else 0.0,
                              "input_wait_fraction": waited / seconds if seconds else 0.0,
                              "torch_threads": torch.get_num_threads(), "precision": precision, **peak_memory(on_gpu), **static}
        running.clear()
        checkpoint_now = steps.checkpoint_due(final)
        if checkpoint_now and val_shard is not None:
            metrics |= validation_losses(engine, val_shard, spec.deepspeed.micro_batch_size, objectives, weights, device, number, precision,
                                         loss_fn)
        line = steps.progress(metrics)
        if line and rank == 0:
            log.info("%s %s", spec.run.name, line)
        if not checkpoint_now:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="fmrilm-lm-ckpt-") as d:
            engine.save_checkpoint(d, tag="ds", client_state={"step": steps.done}, exclude_frozen_parameters=spec.lora.enabled)
            write_meta(d, {"step": steps.done, "shape": shape})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=checkpoint_name(steps.done, suffix))

    micro = 0
    last = micro_end = time.perf_counter()
    engine.train()
    for batch in steps.batches(shard, spec.deepspeed.micro_batch_size, spec.train.epochs, spec.deepspeed.grad_accum,
                               collate_fn=packed_collate(), pin_memory=pin):
        pending_wait += time.perf_counter() - micro_end  # waiting for this batch (the input pipeline)
        with autocast(precision, device):
            loss, parts = loss_fn(engine, {k: v.to(device, non_blocking=pin) for k, v in batch.items()}, weights, number)
        engine.backward(loss)
        engine.step()
        micro_end = time.perf_counter()
        micro += 1
        running.add({"loss": loss.item(), **{f"loss/{objectives[k]}": v.item() for k, v in parts.items()}})
        if micro % spec.deepspeed.grad_accum:
            continue
        steps.done += 1
        if steps.done > 2:
            seconds += micro_end - last
            waited += pending_wait
            tokens_done += int((batch["segments"] > 0).sum() if "segments" in batch else batch["attention_mask"].sum())
        pending_wait = 0.0
        if steps.report_due():
            report()
        inject_fault(config.get("fault"), steps.done, bool(resumed))
        last = micro_end = time.perf_counter()
    report(final=True)
    return engine


def write_export(engine, zero_stage: int, probe: dict, rank: int, target: str, write) -> None:
    """The export protocol of the LM stages, on every rank: the probe forward (under ZeRO-3 its
    own hooks gather and release each layer; inside a gather they would release the weights
    ``save_pretrained`` needs), then every parameter gathered while rank 0 calls ``write(dir, lm)``
    (model files; returns the metadata) and :func:`fmrilm.artifacts.lm.write_folder` completes the
    export (fMRI input weights, probe, ``fmri_lm.json``, card) and replaces ``target`` with it."""
    import deepspeed

    from fmrilm.artifacts.lm import write_folder

    model = engine.module
    model.eval()
    lm = model.lm if isinstance(model, FMRIInputLM) else model
    logits = probe_logits(model, probe, engine.device)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None, enabled=zero_stage == 3):
        if rank != 0:
            return
        with tempfile.TemporaryDirectory(prefix="fmrilm-export-") as d:
            write_folder(d, target, write(d, lm), model, probe, logits)
