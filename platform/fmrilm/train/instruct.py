"""Stage 3: multi-task instruction tuning with LoRA (peft) and DeepSpeed on Ray Train.

Driver: reads the pretrained LM export (``fmrilm run jobs/pretrain.yaml``), builds the
``instructions`` table of the *training* subjects (:mod:`fmrilm.data.instructions`; written to
``<storage>/<run>/instructions.parquet`` for inspection), encodes each row with the scan's fMRI
block and packs them (loss on answer tokens only; one objective per task, so the loss is
reported per task and ``instructions.tasks`` weights mix them), and runs a ``TorchTrainer``.

Worker: loads the export (a LoRA-pretrained export is merged first), puts fresh LoRA adapters
on it (the fMRI rows of the embeddings train with them), or with ``lora.enabled=false`` trains
every weight, with :func:`fmrilm.train.loop.deepspeed_train` (ZeRO 0-3, resume by run name, every
rank checkpoints). Export: ``<storage>/<run>/model`` in the ``adapter`` layout (``adapter/`` +
``fmri_lm.json`` naming the base export, + the fMRI input weights: projectors), or the
``full`` layout after full fine-tuning; :func:`fmrilm.artifacts.lm.load_exported` loads both and
``fmrilm lm merge`` merges the first.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from fmrilm import runtime, storage
from fmrilm.artifacts import lm as lm_artifact
from fmrilm.artifacts.lm import export_meta, export_tokenizer, load_model
from fmrilm.config import StageSpec
from fmrilm.data import splits
from fmrilm.data.instructions import TASKS, InstructionSpec, build_instructions, encode_rows, fit_labeller, with_descriptions
from fmrilm.data.lm_sequences import pack
from fmrilm.data.pipeline import DataSpec, scan_meta
from fmrilm.errors import UserError
from fmrilm.features.store import first_captions
from fmrilm.models.fmri_lm import FMRIInputLM
from fmrilm.models.lora import LoraSpec, add_adapters
from fmrilm.models.number_loss import NumberObjective, number_objective
from fmrilm.artifacts.tokens import ScanBlocks
from fmrilm.train.checkpoints import DEEPSPEED_GLOBALS, shape_of
from fmrilm.train.faults import fault_plan
from fmrilm.train.optim import OptimSpec
from fmrilm.train.specs import RunSpec, ScalingSpec, worker_spec
from fmrilm.train.trainer import run_trainer
from fmrilm.train.deepspeed import DeepSpeedSpec

log = logging.getLogger("fmrilm.instruct")


class InstructSpec(StageSpec):
    """Spec of ``jobs/instruct.yaml``."""

    kind: Literal["instruct"] = "instruct"
    model: str = Field("./fmrilm-data/runs/pretrain/model", description="the pretrained LM export (pretrain stage)")
    tokens: str | None = Field(None, description="tokens table URI (default: beside the export's tokenizer)")
    data: DataSpec = DataSpec()
    instructions: InstructionSpec = InstructionSpec()
    fmri_steps: int = Field(4, ge=1, description="time steps of each scan's fMRI block in a prompt (fewer if the row would not fit)")
    descriptions: bool = Field(False, description="follow each scan's fMRI block with its description (first caption) in every "
                               "prompt: fMRI-LM's descriptor prompt part, a paradigm of its own; evaluation asks the same way")
    seq_len: int = Field(512, ge=32)
    lora: LoraSpec = Field(LoraSpec(enabled=True, r=8, alpha=16, dropout=0.1),
                           description="LoRA adapters (the fMRI rows train with them); enabled=false fine-tunes every weight "
                                       "(small backbones: the head and norms then learn the answers too)")
    deepspeed: DeepSpeedSpec = DeepSpeedSpec(zero_stage=2)
    train: OptimSpec = OptimSpec(epochs=3, lr=5e-4, warmup_steps=5, checkpoint_every=50, log_every=5)
    scan_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the standardised scan vector while tuning (the scan "
                                "projector sees each training scan through a different mask: less memorised)")
    number_loss: float = Field(1.0, ge=0, description="weight of the number-token loss on the age answers: the squared error of "
                               "the expected number under the model's probabilities, so nearby ages count as near (0: "
                               "cross-entropy only, every number an unrelated class)")
    validation: float = Field(0.0, ge=0, lt=1, description="fraction of the training subjects held out of LoRA training; "
                              "their instruction losses are reported as val/loss, val/loss/<task> at each checkpoint "
                              "(what sweeps select on; never the held-out test subjects)")
    scaling: ScalingSpec = ScalingSpec(num_workers=2, cpus_per_worker=0.5)
    run: RunSpec = RunSpec(name="instruct")


# ---------------------------------------------------------------- driver


def training_split(spec: InstructSpec, meta: pd.DataFrame, base_split: dict | None) -> dict:
    """The split record of this run, after checking that no subject it holds out (``val``,
    ``test``) trained the pretrained export or the features build (captions)."""
    from fmrilm.features.store import features_split

    upstream = {f"the pretrained export {spec.model}": base_split, f"the features build of {spec.data.root}": features_split(spec.data.root, spec.data.datasets)}
    return splits.stage_record(splits.inherited(spec.data.split, base_split), meta, upstream, "held out", meta.attrs.get("versions"))


def check(spec: InstructSpec) -> dict:
    """Checks before any worker starts: the export exists, LoRA targets exist, the datasets match
    its input contract; returns its meta."""
    from fmrilm.train.lm import check_inputs

    meta = lm_artifact.check_tunable(spec.model, spec.lora, spec.seq_len)
    check_inputs(meta.get("contract"), spec.data.root, spec.data.datasets, f"the export {spec.model}")
    return meta


VALIDATION = "tuning_validation"  # the split name of the held-out training subjects in the instructions table


def validation_subjects(meta: pd.DataFrame, fraction: float, seed: int) -> set[str]:
    """A seeded ``fraction`` of the training subjects (at least one when ``fraction > 0`` and
    there are two or more), held out of LoRA training for validation."""
    subjects = sorted(set(meta.loc[meta["split"] == "train", "subject_id"]))
    if fraction <= 0 or len(subjects) < 2:
        return set()
    n = min(len(subjects) - 1, max(1, round(fraction * len(subjects))))
    return set(np.random.default_rng(seed).choice(subjects, size=n, replace=False).tolist())


def prepare(spec: InstructSpec, tokenizer) -> dict:
    """Instructions of the training subjects, encoded and packed (``packed``), those of the
    validation subjects (``val``, when ``spec.validation > 0``); the rows are written as a table
    (``split``: ``train`` or ``tuning_validation``)."""
    from fmrilm.features.store import read_captions
    from fmrilm.train.lm import pad_rows

    base_split = export_meta(spec.model).get("split")
    meta = scan_meta(spec.data.root, spec.data.datasets, splits.inherited(spec.data.split, base_split))
    record = training_split(spec, meta, base_split)
    blocks = ScanBlocks(spec.model, spec.data.root, spec.data.datasets, spec.tokens)
    meta = meta[meta["scan_id"].isin(blocks.codes)].copy()
    held = validation_subjects(meta, spec.validation, spec.instructions.seed)
    # a split of its own: the dataset's val/test splits are evaluation's held-out subjects (never tuned on)
    meta.loc[meta["subject_id"].isin(held) & (meta["split"] == "train"), "split"] = VALIDATION
    captions = read_captions(spec.data.root, spec.data.datasets)
    labeller = fit_labeller(meta)  # from the remaining training subjects; in-context support comes from them too
    rows = build_instructions(meta, captions, spec.instructions, labeller, splits=("train", VALIDATION))
    if spec.descriptions:
        rows["prompt"] = [with_descriptions(p, first_captions(captions)) for p in rows["prompt"]]
    if not (rows["split"] == "train").any():
        raise UserError(f"no instructions: the training split of {spec.data.root} has no scan with tokens and a known answer "
                         f"for tasks {sorted(spec.instructions.tasks)}")
    where = storage.resolve(storage.join(spec.run.storage, spec.run.name, "instructions.parquet"))
    storage.write_parquet(where, rows)
    objective_of = {t: i for i, t in enumerate(TASKS)}
    out = {"table": where.uri, "split": record, "validation_subjects": sorted(held)}
    for split in ("train", VALIDATION):
        part = rows[rows["split"] == split].reset_index(drop=True)
        if part.empty:
            continue
        examples, kept = encode_rows(part, blocks, tokenizer, spec.fmri_steps, spec.seq_len, objective_of)
        out["packed" if split == "train" else "val"] = pad_rows(pack(examples, spec.seq_len, tokenizer.pad_token_id),
                                                               spec.scaling.num_workers, tokenizer.pad_token_id)
        counts = part.iloc[kept].groupby(["task", "paradigm"]).size()
        out["rows" if split == "train" else "val_rows"] = len(kept)
        if split == "train":
            out["counts"] = {f"{t}/{p}": int(n) for (t, p), n in counts.items()}
            out["number"] = number_objective(out["packed"], tokenizer, TASKS.index("age"), spec.number_loss, part=len(TASKS))
    if held and "val" not in out:
        log.warning("validation subjects %s have no instruction that fits seq_len: no validation metrics", sorted(held))
    return out


def run(spec: InstructSpec) -> dict:
    """Check, build instructions, tune LoRA (or resume), export; returns metrics and the model URI."""
    from fmrilm.train.lm import probe_row, to_dataset

    check(spec)
    runtime.init_ray()
    prepared = prepare(spec, export_tokenizer(spec.model))
    packed = prepared["packed"]
    probe = probe_row(packed)
    number = prepared.get("number")
    config = {"spec": worker_spec(spec), "rows_per_rank": math.ceil(len(packed["ids"]) / spec.scaling.num_workers),
              "probe": probe, "fault": fault_plan(), "has_val": "val" in prepared, "split": prepared["split"],
              "validation_subjects": prepared["validation_subjects"],
              "number": number.as_dict() if number else None}
    worker = InstructSpec(**config["spec"])  # the spec as the workers see it (local paths absolute)
    config["shape"] = shape_of(model=worker.model, lora=worker.lora, num_codes=None)
    datasets = {"train": to_dataset(packed)} | ({"val": to_dataset(prepared["val"])} if "val" in prepared else {})
    result = run_trainer(train_loop, config, spec.scaling, datasets, spec.run, prepared["split"]["datasets"], config["shape"],
                         DEEPSPEED_GLOBALS)
    return {"metrics": dict(result.metrics or {}), "model": lm_artifact.location(spec.run.storage, spec.run.name),
            "instructions": prepared["table"], "rows": prepared["rows"], "task_rows": prepared["counts"],
            "validation_rows": prepared.get("val_rows", 0)}


# ---------------------------------------------------------------- worker


def train_loop(config: dict) -> None:
    """Ray Train worker of the instruct stage (see the module docstring)."""
    import ray.train

    from fmrilm.train.loop import deepspeed_train

    spec = InstructSpec(**config["spec"])
    torch.manual_seed(spec.train.seed)
    model, tok, meta = load_model(spec.model)
    if isinstance(model, FMRIInputLM):
        model.scan_dropout = spec.scan_dropout
    if spec.lora.enabled:
        model = add_adapters(model, spec.lora, meta.get("vocab"))
    weights = {i: spec.instructions.tasks.get(t, 0.0) for i, t in enumerate(TASKS)}
    number = NumberObjective.from_dict(config["number"]) if config.get("number") else None
    engine = deepspeed_train(spec, model, config, (*TASKS, "number"), weights, {}, config["shape"], number)
    export(engine, tok, spec, meta, config["probe"], ray.train.get_context().get_world_rank(), config.get("split"),
           config.get("validation_subjects", []))


def export(engine, tok, spec: InstructSpec, base_meta: dict, probe: dict, rank: int, split_rec: dict | None = None,
           validation_subjects: list[str] = ()) -> None:
    """Write the export (every rank takes part: ZeRO-3 gathers): ``adapter/`` over the pretrained
    export, or with ``lora.enabled=false`` the whole fine-tuned model (``full/``); ``fmri_lm.json``
    names the base export either way and carries the split record and the training subjects held
    out of tuning (``validation_subjects``: evaluation calibrates its answers on them)."""
    from fmrilm.train.loop import write_export

    def write(d: str, lm) -> dict:
        layout = lm_artifact.save_tuned(d, lm, tok, spec.lora.enabled)
        meta = {k: base_meta[k] for k in lm_artifact.TUNED_KEYS if k in base_meta}
        return meta | {"layout": layout, "base_model": spec.model, "lora": spec.lora.enabled, "seq_len": spec.seq_len, "stage": "instruct",
                       "fmri_steps": spec.fmri_steps, "tasks": spec.instructions.tasks, "split": split_rec,
                       "descriptions": spec.descriptions, "validation_subjects": list(validation_subjects)}

    write_export(engine, spec.deepspeed.zero_stage, probe, rank, lm_artifact.location(spec.run.storage, spec.run.name), write)


def summary(result: dict) -> list[str]:
    """Lines a person reads after :func:`run`; the first is the headline (losses per task)."""
    m = result["metrics"]
    return [", ".join(f"{k} {v:.3f}" for k, v in m.items() if k.startswith("loss")) + f" (step {m.get('step')})",
            f"model: {result['model']} ({result['rows']} instruction rows; table {result['instructions']})"]
