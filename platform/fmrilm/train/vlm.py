"""The poster's baseline: a vision-language model fine-tuned with LoRA on fMRI shown as images.

Driver: reads the scan index and the training subjects' series, fits the colour scale on them
(:func:`fmrilm.features.images.fit_scale`), renders each training scan
(:func:`~fmrilm.features.images.render`: carpet, FC heatmap or both), asks each task's question
about it in the model's own chat template with the answer as the assistant's turn (loss on the
answer tokens only, one objective per task), and runs a ``TorchTrainer``.

Worker: loads the VLM (built-in tiny, a folder, an ``s3://`` copy or a hub id), puts LoRA on its
language model (:func:`fmrilm.models.vlm.lora_pattern`; the vision side stays frozen) or with
``lora.enabled=false`` tunes every weight, and trains it with the LM stages' DeepSpeed loop
(:func:`fmrilm.train.loop.deepspeed_train`: ZeRO 0-3, resume by run name, checkpoints on every
rank). Export: :mod:`fmrilm.artifacts.vlm` under ``<storage>/<run>/model``; ``fmrilm eval`` with
``vlm: [<export>]`` scores it on the same held-out subjects as fmrilm and the baselines.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from fmrilm import runtime, storage
from fmrilm.artifacts import lm as lm_artifact
from fmrilm.config import StageSpec, Strict
from fmrilm.data import splits, table
from fmrilm.data.instructions import QUESTIONS, TASKS, Labeller, answerable, fit_labeller
from fmrilm.data.pipeline import DataSpec, scan_meta
from fmrilm.errors import UserError
from fmrilm.features.images import View, fit_scale, render
from fmrilm.models.lora import LoraSpec
from fmrilm.train.checkpoints import DEEPSPEED_GLOBALS, shape_of
from fmrilm.train.deepspeed import DeepSpeedSpec
from fmrilm.train.faults import fault_plan
from fmrilm.train.lm import to_dataset
from fmrilm.train.optim import OptimSpec
from fmrilm.train.specs import RunSpec, ScalingSpec, worker_spec
from fmrilm.train.trainer import run_trainer

log = logging.getLogger("fmrilm.vlm")


class RenderSpec(Strict):
    """How a scan becomes an image (:mod:`fmrilm.features.images`)."""

    view: View = Field("both", description="carpet (ROIs x time), fc (connectivity heatmap) or both side by side")
    size: int = Field(224, ge=16, description="pixels per view (height and width); a built-in VLM is built for this size")


class VLMSpec(StageSpec):
    """Spec of ``jobs/baseline_vlm.yaml``."""

    kind: Literal["vlm"] = "vlm"
    model: str = Field("tiny-llava", description="tiny-llava | tiny-idefics3 | a folder or s3:// copy of a Hugging Face "
                       "image-text-to-text model (Qwen2-VL / Qwen2.5-VL, Llama-3.2-Vision, LLaVA, Idefics3 / SmolVLM) | hub id")
    cache_dir: str | None = Field(None, description="where copies of the model live on each node (default: FMRILM_CACHE, else ~/.cache/fmrilm)")
    data: DataSpec = DataSpec()
    render: RenderSpec = RenderSpec()
    tasks: dict[str, float] = Field({"age": 1.0, "sex": 1.0}, description="task -> loss weight (classification and age)")
    paraphrases: bool = Field(True, description="draw each question from its paraphrases (else the first wording)")
    seq_len: int = Field(512, ge=32, description="tokens of a row: the image's tokens, the question and the answer")
    lora: LoraSpec = LoraSpec(enabled=True, r=8, alpha=16, dropout=0.05)
    deepspeed: DeepSpeedSpec = DeepSpeedSpec(zero_stage=2, micro_batch_size=4)
    train: OptimSpec = OptimSpec(epochs=3, lr=2e-4, warmup_steps=5, checkpoint_every=50, log_every=5)
    scaling: ScalingSpec = ScalingSpec(num_workers=2, cpus_per_worker=0.5)
    run: RunSpec = RunSpec(name="vlm")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v):
        answerable(list(v), "vlm")
        if not any(w > 0 for w in v.values()):
            raise ValueError("tasks needs at least one task with a positive weight")
        return v


# ---------------------------------------------------------------- driver


def check(spec: VLMSpec):
    """Every check before a worker starts, without loading the weights: the model's family is
    supported, its processor loads, LoRA finds language-model modules. Returns ``(processor,
    family, info)``."""
    from fmrilm.models.vlm import family_of, language_targets, load_processor, skeleton

    processor, config, info = load_processor(spec.model, spec.render.size, spec.cache_dir)
    if spec.lora.enabled:
        language_targets(skeleton(config), spec.lora.target_modules)
    return processor, family_of(config), info


def question(task: str, paraphrases: bool, rng: np.random.Generator) -> str:
    """The question of ``task``: a seeded paraphrase, or the first wording."""
    options = QUESTIONS[task]
    return options[int(rng.integers(len(options)))] if paraphrases else options[0]


def answer_text(task: str, row, labeller: Labeller) -> str | None:
    """The answer a VLM is trained to give (no leading space), or None when unknown."""
    said = labeller.answer(task, row, {}, np.random.default_rng(0))
    return None if said is None else said.strip()


def pad_rows(rows: dict[str, np.ndarray], world: int) -> dict[str, np.ndarray]:
    """Append copies of the first row with no targets so the row count divides ``world``."""
    pad = (-len(rows["ids"])) % world
    if not pad:
        return rows
    extra = {k: np.repeat(v[:1], pad, axis=0) for k, v in rows.items()}
    extra["targets"][:] = -100
    extra["objective"][:] = -1
    return {k: np.concatenate([v, extra[k]]) for k, v in rows.items()}


def prepare(spec: VLMSpec, processor, family) -> dict:
    """The encoded training rows (``rows``: stacked arrays), their count per task, the colour
    scale, the labeller's classes and the run's split record."""
    from fmrilm.models.vlm import encode

    meta = scan_meta(spec.data.root, spec.data.datasets, spec.data.split)
    record = splits.stage_record(spec.data.split, meta, {}, "held out", meta.attrs.get("versions"))
    train = meta[meta["split"] == "train"]
    if train.empty:
        raise UserError(f"no training scans under {spec.data.root} (datasets {spec.data.datasets or 'all'})")
    series, _ = table.series_of(spec.data.root, train["scan_id"])
    scale = fit_scale(x for x, _ in series.values())
    labeller = fit_labeller(meta)
    rng = np.random.default_rng(spec.train.seed)
    encoded, counts = [], {}
    for row in train.itertuples(index=False):
        if row.scan_id not in series:
            continue
        image = render(series[row.scan_id][0], spec.render.view, scale, spec.render.size)
        for task in (t for t, w in spec.tasks.items() if w > 0):
            said = answer_text(task, row, labeller)
            if said is None:
                continue
            try:
                encoded.append(encode(processor, family, image, question(task, spec.paraphrases, rng), said, spec.seq_len, TASKS.index(task)))
            except ValueError as err:
                raise UserError(f"scan {row.scan_id}, task {task}: {err} (the image alone takes most of it): raise seq_len") from None
            counts[task] = counts.get(task, 0) + 1
    if not encoded:
        raise UserError(f"no training rows: the training scans under {spec.data.root} have no known answer for tasks {sorted(spec.tasks)}")
    rows = pad_rows({k: np.stack([e[k] for e in encoded]) for k in encoded[0]}, spec.scaling.num_workers)
    return {"rows": rows, "counts": counts, "scale": scale, "classes": labeller.classes, "age_cuts": labeller.age_cuts,
            "split": record, "n": len(encoded)}


def model_shape(spec: VLMSpec) -> dict:
    """The spec keys that size the model, recorded in every checkpoint: a resume with others is refused."""
    return shape_of(model=spec.model, render=spec.render, lora=spec.lora)


def run(spec: VLMSpec) -> dict:
    """Check, render and encode the training rows, tune (or resume), export; returns metrics and the export's URI."""
    processor, family, info = check(spec)
    runtime.init_ray()
    prepared = prepare(spec, processor, family)
    rows = prepared["rows"]
    config = {"spec": worker_spec(spec), "rows_per_rank": math.ceil(len(rows["ids"]) / spec.scaling.num_workers),
              "probe": {k: v[0] for k, v in rows.items() if k not in ("targets", "objective")}, "fault": fault_plan(),
              "has_val": False, "export_meta": {"scale": prepared["scale"].as_dict(), "classes": prepared["classes"],
                                                "age_cuts": prepared["age_cuts"], "split": prepared["split"], "rows": prepared["counts"]}}
    config["shape"] = model_shape(VLMSpec(**config["spec"]))
    result = run_trainer(train_loop, config, spec.scaling, {"train": to_dataset(rows)}, spec.run, prepared["split"]["datasets"],
                         config["shape"], DEEPSPEED_GLOBALS)
    return {"metrics": dict(result.metrics or {}), "model": lm_artifact.location(spec.run.storage, spec.run.name),
            "rows": prepared["n"], "task_rows": prepared["counts"], "family": info["family"], "pretrained": info["pretrained"]}


# ---------------------------------------------------------------- worker


def train_loop(config: dict) -> None:
    """Ray Train worker of the VLM baseline (see the module docstring)."""
    import ray.train

    from fmrilm.models.vlm import family_of, load_vlm, vlm_loss
    from fmrilm.train.loop import deepspeed_train

    spec = VLMSpec(**config["spec"])
    rank = ray.train.get_context().get_world_rank()
    model, processor, info = load_vlm(spec.model, spec.train.seed, spec.render.size, spec.cache_dir)
    family = family_of(model)
    if spec.deepspeed.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    # a built-in VLM's random base weights go into the export beside the adapters (removed however the run ends)
    keep_base = spec.lora.enabled and not info["pretrained"]
    with tempfile.TemporaryDirectory(prefix="fmrilm-vlm-base-") if keep_base else contextlib.nullcontext() as base_dir:
        if keep_base and rank == 0:
            model.save_pretrained(base_dir)
        if spec.lora.enabled:
            model = with_lora(model, spec.lora)
        weights = {TASKS.index(t): w for t, w in spec.tasks.items()}
        static = {"pretrained_vlm": info["pretrained"], "family": info["family"]}
        engine = deepspeed_train(spec, model, config, TASKS, weights, static, config["shape"], loss_fn=vlm_loss(family))
        export(engine, processor, spec, info, config, rank, base_dir)


def with_lora(model, lora: LoraSpec):
    """LoRA adapters on the language model's projections only (peft)."""
    from peft import LoraConfig, get_peft_model

    from fmrilm.models.vlm import lora_pattern

    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora_pattern(lora.target_modules))
    return get_peft_model(model, cfg)


def export(engine, processor, spec: VLMSpec, info: dict, config: dict, rank: int, base_dir: str | None) -> None:
    """Write the export (:mod:`fmrilm.artifacts.vlm`); every rank takes part (ZeRO-3 gathers)."""
    import deepspeed

    from fmrilm.artifacts import vlm as artifact
    from fmrilm.models.vlm import family_of

    model = engine.module
    model.eval()
    logits = artifact.probe_logits(model, config["probe"], family_of(model))
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None, enabled=spec.deepspeed.zero_stage == 3):
        if rank != 0:
            return
        with tempfile.TemporaryDirectory(prefix="fmrilm-vlm-export-") as d:
            if spec.lora.enabled:
                model.save_pretrained(os.path.join(d, "adapter"))
                if base_dir:
                    import shutil

                    shutil.copytree(base_dir, os.path.join(d, "base"))
            else:
                model.save_pretrained(os.path.join(d, "full"), state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
            processor.save_pretrained(os.path.join(d, "processor"))
            meta = config["export_meta"] | {"stage": "vlm", "source": spec.model, "cache_dir": spec.cache_dir, "family": info["family"],
                                            "pretrained": info["pretrained"], "layout": "adapter" if spec.lora.enabled else "full",
                                            "render": spec.render.model_dump(), "tasks": spec.tasks, "seq_len": spec.seq_len,
                                            "paraphrases": spec.paraphrases}
            artifact.write(d, lm_artifact.location(spec.run.storage, spec.run.name), meta, config["probe"], logits)


def summary(result: dict) -> list[str]:
    """Lines a person reads after :func:`run`; the first is the headline (losses per task)."""
    m = result["metrics"]
    lines = [", ".join(f"{k} {v:.3f}" for k, v in m.items() if k.startswith("loss")) + f" (step {m.get('step')})",
             f"model: {result['model']} ({result['family']}; {result['rows']} rows: {result['task_rows']})"]
    if not result["pretrained"]:
        lines.append("warning: a built-in VLM, not pretrained: set model to a real checkpoint (a folder or s3:// copy) for science")
    return lines
