"""Stage 1: train the neural tokenizer on Ray Train (DDP), export the tokenizer artifact.

The driver prepares the window datasets (train/val splits by subject, padded so every rank gets
the same batches), the frozen text embeddings (token bank + per-scan caption embeddings), and
runs a ``TorchTrainer``. Each worker builds :class:`~fmrilm.models.tokenizer_objective.TokenizerObjective`
(tokenizer + alignment head, one DDP module), validates with
:func:`fmrilm.eval.tokenizer.window_metrics`, resumes from
``ray.train.get_checkpoint()`` when the run already has one, and reports metrics every
``log_every`` steps and a checkpoint every ``checkpoint_every`` steps on every rank alike.
The exported artifact (``<storage>/<run>/tokenizer/``) is written by :mod:`fmrilm.artifacts.tokenizer`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, replace
from typing import Literal

import torch
from pydantic import Field, model_validator

from fmrilm import runtime
from fmrilm.artifacts import tokenizer as artifact
from fmrilm.config import StageSpec, Strict
from fmrilm.data import splits, table
from fmrilm.data.contract import input_contract, signal_summary
from fmrilm.data.pipeline import PipelineSpec, dataset_versions, sample_windows, scan_index, selected_datasets, train_datasets
from fmrilm.errors import UserError
from fmrilm.eval.tokenizer import window_metrics
from fmrilm.features.text_bank import text_inputs
from fmrilm.models.alignment import AlignmentConfig, dann_coefficient
from fmrilm.models.tokenizer import FC_INIT_PER_CODE, TokenizerConfig
from fmrilm.models.tokenizer_objective import TokenizerObjective
from fmrilm.train.checkpoints import check_shape, checkpoint_dir, checkpoint_name, load_state, resume, save_state, shape_of
from fmrilm.train.faults import fault_plan, inject_fault
from fmrilm.train.metric_log import MetricLog
from fmrilm.train.optim import cosine_schedule, OptimSpec
from fmrilm.train.specs import RunSpec, ScalingSpec, worker_spec
from fmrilm.train.steps import Running, Steps
from fmrilm.train.trainer import run_trainer

log = logging.getLogger("fmrilm.tokenizer")


class ComputeSpec(Strict):
    """How the tokenizer's steps compute (not what it learns: a run may resume with other values)."""

    precision: Literal["fp32", "autocast"] = Field("fp32", description="autocast: bf16 matmuls under torch.autocast with fp32 "
                                                   "weights (the code search and its EMA stay fp32)")
    activation_checkpointing: bool = Field(False, description="recompute each transformer layer in the backward pass: "
                                           "less activation memory for more compute")


class TokenizerStageSpec(StageSpec):
    """Spec of ``jobs/tokenizer.yaml``."""

    kind: Literal["tokenizer"] = "tokenizer"
    data: PipelineSpec = PipelineSpec(window=32, stride=16)
    model: TokenizerConfig = TokenizerConfig()
    alignment: AlignmentConfig = AlignmentConfig()
    train: OptimSpec = OptimSpec()
    compute: ComputeSpec = ComputeSpec()
    scaling: ScalingSpec = ScalingSpec()
    run: RunSpec = RunSpec()

    @model_validator(mode="after")
    def _window_fits_patches(self):
        if self.model.layout == "connectivity" and self.model.patch != self.data.window:
            raise ValueError(f"model.layout=connectivity codes each window whole: set model.patch={self.data.window} (data.window)")
        if self.data.window % self.model.patch:
            raise ValueError(f"data.window ({self.data.window}) must be a multiple of model.patch ({self.model.patch})")
        if self.data.window // self.model.patch > self.model.max_patches:
            raise ValueError("data.window / model.patch exceeds model.max_patches")
        if self.model.encoder == "fc" and self.model.layout != "connectivity":
            raise ValueError("model.encoder=fc codes a window's correlations: set model.layout=connectivity")
        if self.model.encoder == "fc" and self.alignment.enabled:
            raise ValueError("model.encoder=fc learns no encoder for the alignment to act on: set alignment.domain_weight=0 "
                             "and alignment.contrastive_weight=0")
        return self

    def short_of_codebook_init(self, rows_per_rank: int) -> str | None:
        """Why a run of ``rows_per_rank`` training windows a worker ends before the fc encoder's
        k-means initialisation (``FC_INIT_PER_CODE`` x ``num_codes`` windows over all workers), else ``None``."""
        if self.model.encoder != "fc":
            return None
        steps = Steps.plan(rows_per_rank, self.train.batch_size, self.train).total
        seen, need = steps * self.train.batch_size * self.scaling.num_workers, FC_INIT_PER_CODE * self.model.num_codes
        if seen >= need:
            return None
        return (f"model.encoder=fc fits its codebook once it has seen {need} windows ({FC_INIT_PER_CODE} x model.num_codes), and this run shows it "
                f"{seen} ({steps} steps): it would export a random codebook; raise train.max_steps or train.epochs")

    def with_rois(self, rois: int) -> TokenizerStageSpec:
        """This spec with ``model.rois`` set to the data's ``rois`` where the fc encoder needs it
        (its codebook lives in their pairs' space); one clear line where the spec names others."""
        if self.model.encoder != "fc" or self.model.rois == rois:
            return self
        if self.model.rois:
            raise UserError(f"model.rois={self.model.rois}, but the data has {rois} ROIs: leave model.rois out (the stage reads it from the data)")
        return self.model_copy(update={"model": replace(self.model, rois=rois)})


# ---------------------------------------------------------------- worker side


def optimizer_step(model, opt, sched, batch: dict, coef: float, text_tokens, captions: dict, text_dim: int,
                   grad_clip: float, precision: str = "fp32") -> dict[str, float]:
    """One training step of a (possibly DDP-wrapped) :class:`TokenizerObjective` on a collated
    batch (``x [batch, rois, window]``, ``valid``, ``scan_id``) on the CPU, moved to the model's
    device with the caption embeddings, the forward under bf16 autocast with ``precision``
    ``"autocast"``; returns the loss terms as floats."""
    from fmrilm.train.deepspeed import autocast

    device = next(model.parameters()).device
    mask = emb = None
    if captions:
        mask = torch.tensor([s in captions for s in batch["scan_id"]], device=device)
        emb = torch.stack([captions.get(s, torch.zeros(text_dim)) for s in batch["scan_id"]]).to(device)
    with autocast(precision, device):
        out = model(batch["x"].to(device), batch["valid"].to(device), coef, text_tokens, emb, mask, batch["scan_id"])
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)  # a DDP wrapper's parameters are its module's
    opt.step()
    sched.step()
    return {"loss": out["loss"].item()} | {k: float(v) for k, v in out["terms"].items()}


def train_loop(config: dict) -> None:
    """Ray Train worker: the tokenizer training loop (see module docstring)."""
    import ray.train
    import ray.train.torch

    spec = TokenizerStageSpec(**config["spec"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(spec.train.seed)
    text_tokens = torch.from_numpy(config["text_tokens"]) if config.get("text_tokens") is not None else None
    captions = {k: torch.from_numpy(v) for k, v in (config.get("captions") or {}).items()}
    text_dim = config["text_dim"]
    objective = TokenizerObjective(spec.model, spec.alignment, text_dim)
    objective.tokenizer.checkpointing = spec.compute.activation_checkpointing
    opt = torch.optim.AdamW(objective.parameters(), lr=spec.train.lr, weight_decay=spec.train.weight_decay)
    steps = Steps.plan(config["rows_per_rank"], spec.train.batch_size, spec.train)
    sched = cosine_schedule(opt, spec.train.warmup_steps, steps.total)
    resumed = {}
    shape = config["shape"]

    def load(ckpt):
        state, meta = load_state(ckpt)
        check_shape(meta, shape, f"checkpoint {ckpt.path} of run {spec.run.name!r}")
        return state, meta

    loaded, ckpt, suffix = resume(load, log)
    if loaded is not None:
        state, meta = loaded
        objective.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        steps.done = meta["step"]
        resumed = {"resumed_from_step": steps.done, "resumed_codebook_sum": float(objective.tokenizer.quantizer.codebook.sum())}
        if rank == 0:
            log.info("resumed at step %d from %s", steps.done, ckpt.path)
    unused = spec.model.encoder != "fc"  # the learned layouts leave some weights out of some steps; the fc encoder's one weight never
    model = ray.train.torch.prepare_model(objective, parallel_strategy_kwargs={"find_unused_parameters": unused})
    if text_tokens is not None:
        text_tokens = text_tokens.to(ray.train.torch.get_device())
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config.get("has_val") else None
    metrics_log = MetricLog(spec.run, rank)
    running = Running()
    timed_samples, timed_seconds = 0, 0.0

    def report(final: bool = False) -> None:
        metrics = running.means() | resumed | {
            "step": steps.done, "epoch": steps.epoch, "lr": sched.get_last_lr()[0],
            "samples_per_s": timed_samples / timed_seconds if timed_seconds else 0.0, "torch_threads": torch.get_num_threads()}
        checkpoint_now = steps.checkpoint_due(final)
        if checkpoint_now and val_shard is not None:
            metrics |= window_metrics(objective, val_shard, spec.train.batch_size, text_tokens)
        metrics |= {f"codebook/{k}": v for k, v in objective.tokenizer.quantizer.stats().items() if isinstance(v, (int, float))}
        metrics_log.log(metrics, steps.done)
        running.clear()
        line = steps.progress(metrics)
        if line and rank == 0:
            log.info("tokenizer %s", line)
        if checkpoint_now:
            with checkpoint_dir() as d:
                if rank == 0:
                    save_state(d, {"model": objective.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                               {"step": steps.done, "spec": config["spec"], "text_dim": text_dim, "shape": shape})
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None,
                                 checkpoint_dir_name=checkpoint_name(steps.done, suffix))
        else:
            ray.train.report(metrics)

    last = time.perf_counter()
    for batch in steps.batches(train_shard, spec.train.batch_size, spec.train.epochs):
        terms = optimizer_step(model, opt, sched, batch, dann_coefficient(steps.done / max(1, steps.total)), text_tokens, captions,
                               text_dim, spec.train.grad_clip, spec.compute.precision)
        steps.done += 1
        if steps.done > 3:  # steady state (past codebook init and first allocations); includes waiting for data
            timed_seconds += time.perf_counter() - last
            timed_samples += int(batch["valid"].sum())
        running.add(terms)
        if steps.report_due():
            report()
        inject_fault(config.get("fault"), steps.done, bool(resumed))
        last = time.perf_counter()  # reports and checkpoints are not training throughput
    report(final=True)
    metrics_log.close()


# ---------------------------------------------------------------- driver side


def check(spec: TokenizerStageSpec) -> None:
    """Checks before any worker starts: the datasets the spec reads exist and share an atlas."""
    found = selected_datasets(spec.data)
    spec.with_rois(training_contract(spec, [m for _, m in found])["n_rois"])


def training_contract(spec: TokenizerStageSpec, manifests: list[dict]) -> dict:
    """The input contract (:mod:`fmrilm.data.contract`) the artifact of this run records."""
    d = spec.data
    return input_contract(manifests, d.window, d.stride, spec.model.patch, d.normalise, d.target_tr, d.atlas_mapping)


def run(spec: TokenizerStageSpec) -> dict:
    """Train (or resume) the tokenizer and export its artifact; returns the final metrics and
    the artifact URI."""
    runtime.init_ray()
    if spec.model.layout == "connectivity" and spec.alignment.domain_weight > 0:
        log.warning("model.layout=connectivity with the domain classifier (alignment.domain_weight=%g): with one token a window "
                    "its reversed gradient has collapsed the codebook to a few codes in every run so far (docs/stages.md); "
                    "alignment.domain_weight=0 keeps them", spec.alignment.domain_weight)
    world = spec.scaling.num_workers
    found = selected_datasets(spec.data)
    index = scan_index(spec.data, found)
    split_rec = training_split(spec, index, found)
    trained = set(index.loc[index["split"] == "train", "dataset"])
    contract = training_contract(spec, [m for _, m in found if m["dataset"] in trained] or [m for _, m in found])
    spec = spec.with_rois(contract["n_rois"])
    contract["signal"] = signal_summary(sample_windows(spec.data, "train"))  # what a distribution shift is measured against
    has_val = bool(index.loc[index["split"] == "val", "n_windows"].sum())
    if not has_val:
        val_scans = int((index["split"] == "val").sum())
        log.warning("no validation windows (%s): training without validation", f"no scan of the 'val' split is at least window="
                    f"{spec.data.window} long" if val_scans else "the split puts no subject in 'val'; a few more subjects give it some")
    prepared = train_datasets(spec.data, world, ("train", "val") if has_val else ("train",))
    text_tokens, caption_emb = text_inputs(spec.alignment, spec.data, set(index.loc[index["split"] == "train", "scan_id"]))
    rows = prepared["sizes"]["train"]
    text_dim = text_tokens.shape[1] if text_tokens is not None else 8
    config = {"spec": worker_spec(spec), "text_tokens": text_tokens, "captions": caption_emb, "text_dim": text_dim,
              "rows_per_rank": math.ceil(rows / world), "has_val": "val" in prepared["datasets"],
              "fault": fault_plan()}
    short = spec.short_of_codebook_init(config["rows_per_rank"])
    if short:
        log.warning("%s", short)
    worker = TokenizerStageSpec(**config["spec"])  # the spec as the workers see it (local paths absolute)
    config["shape"] = shape_of(model=worker.model, alignment=worker.alignment, text_dim=text_dim)
    with table.reading(found):  # `fmrilm data gc` keeps the versions this run streams
        result = run_trainer(train_loop, config, spec.scaling, prepared["datasets"], spec.run, split_rec["datasets"], config["shape"])
    if result.checkpoint is None:
        raise RuntimeError(f"run {spec.run.name} finished without a checkpoint")
    uri = export(result.checkpoint, spec, split_rec, contract, dict(result.metrics or {}))
    return {"metrics": dict(result.metrics or {}), "artifact": uri, "train_windows": rows}


def training_split(spec: TokenizerStageSpec, index, found) -> dict:
    """The split record of this run (:func:`fmrilm.data.splits.stage_record`); with alignment on
    it reads captions, so no subject it validates on may have trained their features build."""
    from fmrilm.features.store import features_split

    upstream = {f"the features build of {spec.data.root}": features_split(spec.data.root, spec.data.datasets)} if spec.alignment.enabled else {}
    return splits.stage_record(spec.data.split, index, upstream, "validated on", dataset_versions(found))


def export(checkpoint, spec: TokenizerStageSpec, split_rec: dict | None = None, contract: dict | None = None,
           metrics: dict | None = None) -> str:
    """Write the tokenizer artifact (:mod:`fmrilm.artifacts.tokenizer`) of the run's final
    ``checkpoint``, recording the split record ``split_rec``, the input ``contract`` and the final
    validation ``metrics``; returns its URI."""
    state, meta = load_state(checkpoint)
    objective = TokenizerObjective(spec.model, spec.alignment, meta["text_dim"])
    objective.load_state_dict(state["model"])
    cfg = {"model": asdict(spec.model), "alignment": asdict(spec.alignment), "text_dim": meta["text_dim"],
           "data": {"window": spec.data.window, "stride": spec.data.stride, "normalise": spec.data.normalise, "target_tr": spec.data.target_tr},
           "step": meta["step"], "run": spec.run.name, "split": split_rec, "contract": contract}
    return artifact.write(artifact.location(spec.run.storage, spec.run.name), objective, cfg, metrics)


def summary(result: dict) -> list[str]:
    """Lines a person reads after :func:`run`; the first is the headline (validation figures)."""
    m = result["metrics"]
    figures = ", ".join(f"{k} {m[k]:.3f}" for k in ("val/r2", "val/fc_preservation", "val/perplexity", "val/used_fraction",
                                                     "val/domain_acc", "samples_per_s") if k in m)
    return [f"{figures} (step {m.get('step')})", f"tokenizer artifact: {result['artifact']} ({result['train_windows']} train windows)"]
