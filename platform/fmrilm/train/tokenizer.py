"""Stage 1: train the neural tokenizer on Ray Train (DDP), export the tokenizer artifact.

The driver prepares the window datasets (train/val splits by subject, padded so every rank gets
the same batches), the frozen text embeddings (token bank + per-scan caption embeddings), and
runs a ``TorchTrainer``. Each worker builds :class:`TokenizerObjective` (tokenizer + alignment
head, one DDP module: the gradient-reversal branch runs inside the same forward), resumes from
``ray.train.get_checkpoint()`` when the run already has one, and reports metrics every
``log_every`` steps and a checkpoint every ``checkpoint_every`` steps on every rank alike.
The exported artifact (``<storage>/<run>/tokenizer/``) holds ``config.json``,
``model.safetensors`` (+ ``alignment.safetensors``) and ``codebook_stats.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field, model_validator
from torch import nn

from fmrilm import runtime, storage
from fmrilm.config import Strict
from fmrilm.data import splits
from fmrilm.data.contract import input_contract, signal_summary
from fmrilm.data.pipeline import (PipelineSpec, dataset_versions, epoch_stream, sample_windows, scan_index, selected_datasets,
                                  torch_batches, train_datasets)
from fmrilm.models.alignment import AlignmentConfig, AlignmentHead, dann_coefficient
from fmrilm.models.tokenizer import FMRITokenizer, TokenizerConfig, r2_per_roi
from fmrilm.train.common import (MetricLog, OptimSpec, RunSpec, ScalingSpec, check_shape, checkpoint_dir, checkpoint_name, cosine_schedule, fault_plan,
                                 inject_fault, load_state, resume, run_config, run_trainer, save_state, shape_of, worker_spec)

log = logging.getLogger("fmrilm.tokenizer")
ARTIFACT = "tokenizer"


class ComputeSpec(Strict):
    """How the tokenizer's steps compute (not what it learns: a run may resume with other values)."""

    precision: Literal["fp32", "autocast"] = Field("fp32", description="autocast: bf16 matmuls under torch.autocast with fp32 "
                                                   "weights (the code search and its EMA stay fp32)")
    activation_checkpointing: bool = Field(False, description="recompute each transformer layer in the backward pass: "
                                           "less activation memory for more compute")


class TokenizerStageSpec(Strict):
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
        if self.data.window % self.model.patch:
            raise ValueError(f"data.window ({self.data.window}) must be a multiple of model.patch ({self.model.patch})")
        if self.data.window // self.model.patch > self.model.max_patches:
            raise ValueError("data.window / model.patch exceeds model.max_patches")
        return self


class TokenizerObjective(nn.Module):
    """Tokenizer + alignment head with one forward that returns every loss term and metric."""

    def __init__(self, cfg: TokenizerConfig, align: AlignmentConfig, text_dim: int):
        super().__init__()
        self.tokenizer = FMRITokenizer(cfg)
        self.align = AlignmentHead(cfg.width, text_dim, align) if align.enabled else None
        self.align_cfg = align

    def forward(self, x, valid, coef: float = 0.0, text_tokens=None, caption_emb=None, caption_mask=None, groups=None) -> dict:
        out = self.tokenizer(x)
        w = valid.float()
        n = w.sum().clamp_min(1)
        mse = (((out.recon - x) ** 2).mean(dim=(1, 2)) * w).sum() / n
        loss = mse + out.quant.commitment_loss + self.tokenizer.cfg.spectrum_weight * out.spectrum_loss
        terms = {"recon_mse": mse.detach(), "commitment": out.quant.commitment_loss.detach(), "spectrum": out.spectrum_loss.detach()}
        if self.align is not None and self.align_cfg.domain_weight > 0 and text_tokens is not None:
            dom, acc = self.align.domain_loss(out.features, text_tokens, coef, valid)
            loss = loss + self.align_cfg.domain_weight * dom
            terms |= {"domain_loss": dom.detach(), "domain_acc": acc.detach()}
        if self.align is not None and self.align_cfg.contrastive_weight > 0 and caption_emb is not None:
            con = self.align.contrastive_loss(out.features, caption_emb, groups, caption_mask & valid)
            loss = loss + self.align_cfg.contrastive_weight * con
            terms["contrastive_loss"] = con.detach()
        r2 = r2_per_roi(x, out.recon).mean(dim=1)
        terms |= {"r2": ((r2 * w).sum() / n).detach(), "perplexity": out.quant.perplexity.detach(),
                  "used_fraction": out.quant.used_fraction.detach(), "restarted": torch.tensor(float(out.quant.restarted))}
        return {"loss": loss, "terms": terms, "codes": out.codes}


# ---------------------------------------------------------------- worker side


def _sum_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sums over ranks; the tensor lives on ``device`` (NCCL reduces only CUDA tensors)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


@torch.no_grad()
def validate(objective: TokenizerObjective, shard, batch_size: int, text_tokens) -> dict[str, float]:
    """Held-out metrics over a (rank's) validation shard, summed across ranks: R^2 (mean over
    windows x ROIs), MSE, code perplexity/usage, domain-classifier accuracy, and FC preservation
    (per scan, the Pearson r between the upper triangles of the input's and the decoded signal's
    FC over the scan's windows stitched together; mean over scans)."""
    from fmrilm.features.connectivity import fc_preservation, stitch

    objective.eval()
    tok = objective.tokenizer
    device = next(objective.parameters()).device
    sums = {"r2": 0.0, "mse": 0.0, "n": 0.0, "dom_correct": 0.0, "dom_n": 0.0, "fc_r": 0.0, "fc_n": 0.0}
    counts = torch.zeros(tok.cfg.num_codes, dtype=torch.float64, device=device)
    scans: dict[str, list] = {}  # scan -> [(start, input window, decoded window)] for whole-scan FC
    for batch in torch_batches(shard, batch_size):
        x, valid = batch["x"].to(device), batch["valid"].to(device)
        if not valid.any():
            continue
        keep = valid.cpu().numpy()
        x = x[valid]
        out = tok(x)
        for sid, start, xi, ri in zip(np.asarray(batch["scan_id"])[keep], np.asarray(batch["start"])[keep], x.cpu().numpy(),
                                      out.recon.cpu().numpy()):
            scans.setdefault(str(sid), []).append((int(start), xi, ri))
        r2 = r2_per_roi(x, out.recon)
        sums["r2"] += float(r2.sum())
        sums["mse"] += float(((out.recon - x) ** 2).mean(-1).sum())
        sums["n"] += r2.numel()
        counts += torch.bincount(out.codes.flatten(), minlength=tok.cfg.num_codes).double()
        if objective.align is not None and text_tokens is not None:
            _, acc = objective.align.domain_loss(out.features, text_tokens, 0.0)
            k = min(objective.align_cfg.tokens_per_step, out.features.shape[0] * out.features.shape[1], text_tokens.shape[0])
            sums["dom_correct"] += float(acc) * 2 * k
            sums["dom_n"] += 2 * k
    for windows in scans.values():  # the windows this rank holds of each scan, stitched
        sums["fc_r"] += fc_preservation(stitch([(s, xi) for s, xi, _ in windows]), stitch([(s, ri) for s, _, ri in windows]))
        sums["fc_n"] += 1
    sums = _sum_across_ranks(sums, device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    objective.train()
    p = counts / counts.sum().clamp_min(1)
    out = {"val/r2": sums["r2"] / max(sums["n"], 1), "val/mse": sums["mse"] / max(sums["n"], 1),
           "val/perplexity": float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())),
           "val/used_fraction": float((counts > 0).double().mean())}
    if sums["dom_n"]:
        out["val/domain_acc"] = sums["dom_correct"] / sums["dom_n"]
    if sums["fc_n"]:
        out["val/fc_preservation"] = sums["fc_r"] / sums["fc_n"]
    return out


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
    params = model.module.parameters() if hasattr(model, "module") else model.parameters()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
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
    text_dim = text_tokens.shape[1] if text_tokens is not None else 8
    objective = TokenizerObjective(spec.model, spec.alignment, text_dim)
    objective.tokenizer.checkpointing = spec.compute.activation_checkpointing
    opt = torch.optim.AdamW(objective.parameters(), lr=spec.train.lr, weight_decay=spec.train.weight_decay)
    per_epoch = math.ceil(config["rows_per_rank"] / spec.train.batch_size)
    total = min(spec.train.epochs * per_epoch, spec.train.max_steps or 10**12)
    sched = cosine_schedule(opt, spec.train.warmup_steps, total)
    step, resumed = 0, {}
    shape = shape_of(model=spec.model, alignment=spec.alignment, text_dim=text_dim)

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
        step = meta["step"]
        resumed = {"resumed_from_step": step, "resumed_codebook_sum": float(objective.tokenizer.quantizer.codebook.sum())}
        if rank == 0:
            log.info("resumed at step %d from %s", step, ckpt.path)
    model = ray.train.torch.prepare_model(objective, parallel_strategy_kwargs={"find_unused_parameters": True})
    if text_tokens is not None:
        text_tokens = text_tokens.to(ray.train.torch.get_device())
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config.get("has_val") else None
    metrics_log = MetricLog(spec.run, rank)
    running: dict[str, float] = {}
    timed_samples, timed_seconds = 0, 0.0

    def report(final: bool = False) -> None:
        metrics = {k: v / max(running.get("_n", 1), 1) for k, v in running.items() if k != "_n"}
        metrics |= resumed | {"step": step, "epoch": step / per_epoch, "lr": sched.get_last_lr()[0],
                              "samples_per_s": timed_samples / timed_seconds if timed_seconds else 0.0,
                              "torch_threads": torch.get_num_threads()}
        checkpoint_now = final or step % spec.train.checkpoint_every == 0
        if checkpoint_now and val_shard is not None:
            metrics |= validate(objective, val_shard, spec.train.batch_size, text_tokens)
        metrics |= {f"codebook/{k}": v for k, v in objective.tokenizer.quantizer.stats().items() if isinstance(v, (int, float))}
        metrics_log.log(metrics, step)
        running.clear()
        if checkpoint_now:
            with checkpoint_dir() as d:
                if rank == 0:
                    save_state(d, {"model": objective.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                               {"step": step, "spec": config["spec"], "text_dim": text_dim, "shape": shape})
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None,
                                 checkpoint_dir_name=checkpoint_name(step, suffix))
        else:
            ray.train.report(metrics)

    first_epoch = step // per_epoch
    skip = step - first_epoch * per_epoch  # batches of the resumed epoch already trained on
    last = time.perf_counter()
    for epoch, i, batch in epoch_stream(train_shard, spec.train.batch_size, first_epoch, spec.train.epochs):
        if step >= total:  # also when resumed from the final checkpoint
            break
        if epoch == first_epoch and i < skip:
            continue
        terms = optimizer_step(model, opt, sched, batch, dann_coefficient(step / max(1, total)), text_tokens, captions,
                               text_dim, spec.train.grad_clip, spec.compute.precision)
        step += 1
        now = time.perf_counter()
        if step > 3:  # steady state (past codebook init and first allocations); includes waiting for data
            timed_seconds += now - last
            timed_samples += int(batch["valid"].sum())
        running["_n"] = running.get("_n", 0) + 1
        for k, v in terms.items():
            running[k] = running.get(k, 0.0) + v
        if step >= total:
            break
        if step % spec.train.log_every == 0 or step % spec.train.checkpoint_every == 0:
            report()
        inject_fault(config.get("fault"), step, bool(resumed))
        last = time.perf_counter()  # reports and checkpoints are not training throughput
    report(final=True)
    metrics_log.close()


# ---------------------------------------------------------------- driver side


def text_inputs(spec: TokenizerStageSpec, scans: set[str] | None = None) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    """The frozen text side: token-embedding bank and per-scan caption embeddings, from the
    captions of ``scans`` (the training scans; None: every scan)."""
    from fmrilm.models.text import FALLBACK_CORPUS, embed_texts

    if not spec.alignment.enabled:
        return None, {}
    from fmrilm.features.job import read_captions

    captions = {scan: texts[0] for scan, texts in read_captions(spec.data.data, spec.data.datasets).items()
                if scans is None or scan in scans}
    if spec.alignment.contrastive_weight > 0 and not captions:
        raise ValueError("alignment.contrastive_weight > 0 needs captions: run `fmrilm features build` on these datasets first")
    texts = sorted(set(captions.values()))[:2000] or FALLBACK_CORPUS
    tokens, _ = embed_texts(texts, spec.alignment.text_source)
    caption_emb = {}
    if spec.alignment.contrastive_weight > 0:
        ids = sorted(captions)
        _, sentences = embed_texts([captions[i] for i in ids], spec.alignment.text_source)
        caption_emb = dict(zip(ids, sentences))
    return tokens, caption_emb


def check(spec: TokenizerStageSpec) -> None:
    """Checks before any worker starts: the datasets the spec reads exist and share an atlas."""
    found = selected_datasets(spec.data)
    training_contract(spec, [m for _, m in found])


def training_contract(spec: TokenizerStageSpec, manifests: list[dict]) -> dict:
    """The input contract (:mod:`fmrilm.data.contract`) the artifact of this run records."""
    d = spec.data
    return input_contract(manifests, d.window, d.stride, spec.model.patch, d.normalise, d.target_tr, d.atlas_mapping)


def run(spec: TokenizerStageSpec) -> dict:
    """Train (or resume) the tokenizer and export its artifact; returns the final metrics and
    the artifact URI."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    runtime.init_ray()
    world = spec.scaling.num_workers
    found = selected_datasets(spec.data)
    index = scan_index(spec.data, found)
    split_rec = training_split(spec, index, found)
    trained = set(index.loc[index["split"] == "train", "dataset"])
    contract = training_contract(spec, [m for _, m in found if m["dataset"] in trained] or [m for _, m in found])
    contract["signal"] = signal_summary(sample_windows(spec.data, "train"))  # what a distribution shift is measured against
    has_val = bool(index.loc[index["split"] == "val", "n_windows"].sum())
    if not has_val:
        log.warning("no validation windows (no scan of the 'val' split is at least window=%d long): training without validation",
                    spec.data.window)
    prepared = train_datasets(spec.data, world, ("train", "val") if has_val else ("train",))
    text_tokens, caption_emb = text_inputs(spec, set(index.loc[index["split"] == "train", "scan_id"]))
    rows = prepared["sizes"]["train"]
    config = {"spec": worker_spec(spec), "text_tokens": text_tokens, "captions": caption_emb,
              "rows_per_rank": math.ceil(rows / world), "has_val": "val" in prepared["datasets"],
              "fault": fault_plan()}
    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=world, use_gpu=spec.scaling.use_gpu,
                                     resources_per_worker={"CPU": spec.scaling.cpus_per_worker}),
        datasets=prepared["datasets"], run_config=run_config(spec.run),
    )
    result = run_trainer(trainer, spec.run, split_rec["datasets"])
    if result.checkpoint is None:
        raise RuntimeError(f"run {spec.run.name} finished without a checkpoint")
    uri = export(result.checkpoint, spec, split_rec, contract, dict(result.metrics or {}))
    return {"metrics": dict(result.metrics or {}), "artifact": uri, "train_windows": rows}


def training_split(spec: TokenizerStageSpec, index, found) -> dict:
    """The split record of this run (:func:`fmrilm.data.splits.record`), after checking that no
    subject it holds out trained the features build whose captions it reads."""
    from fmrilm.features.job import features_split

    if spec.alignment.enabled:
        heldout = splits.subject_keys(index, ("val", "test"))
        splits.check_unseen(heldout, features_split(spec.data.data, spec.data.datasets), "validated on", f"the features build of {spec.data.data}")
    return splits.record(spec.data.split, index, versions=dataset_versions(found))


def export(checkpoint, spec: TokenizerStageSpec, split_rec: dict | None = None, contract: dict | None = None,
           metrics: dict | None = None) -> str:
    """Write the tokenizer artifact next to the run (``config.json`` carries the split record
    ``split_rec`` and the input ``contract``; ``README.md`` is its card, with the final validation
    ``metrics``); returns its URI."""
    from fmrilm.model_card import tokenizer_card, write_card

    from safetensors.torch import save

    state, meta = load_state(checkpoint)
    objective = TokenizerObjective(spec.model, spec.alignment, meta["text_dim"])
    objective.load_state_dict(state["model"])
    out = storage.resolve(storage.join(spec.run.storage, spec.run.name, ARTIFACT))
    tensors = {k: v.contiguous() for k, v in objective.tokenizer.state_dict().items()}
    storage.write_bytes(out.join("model.safetensors"), save(tensors))
    if objective.align is not None:
        storage.write_bytes(out.join("alignment.safetensors"), save({k: v.contiguous() for k, v in objective.align.state_dict().items()}))
    cfg = {"model": spec.model.model_dump(), "alignment": spec.alignment.model_dump(), "text_dim": meta["text_dim"],
           "data": {"window": spec.data.window, "stride": spec.data.stride, "normalise": spec.data.normalise, "target_tr": spec.data.target_tr},
           "step": meta["step"], "run": spec.run.name, "split": split_rec, "contract": contract}
    storage.write_text(out.join("config.json"), json.dumps(cfg, indent=1))
    stats = objective.tokenizer.quantizer.stats()
    storage.write_text(out.join("codebook_stats.json"), json.dumps({**stats, "usage": objective.tokenizer.quantizer.usage.tolist()}))
    write_card(out.uri, tokenizer_card(cfg, stats, out.uri, metrics))
    return out.uri


def load_artifact(uri: str) -> tuple[FMRITokenizer, dict]:
    """A trained tokenizer (eval mode) and its config from an artifact folder URI."""
    from safetensors.torch import load

    loc = storage.resolve(uri)
    cfg = json.loads(storage.read_text(loc.join("config.json")))
    model = FMRITokenizer(TokenizerConfig(**cfg["model"]))
    model.load_state_dict(load(storage.read_bytes(loc.join("model.safetensors"))))
    return model.eval(), cfg
