"""Stage 3b: k-shot LoRA (the evaluation's ``kshot_lora`` paradigm), adapters tuned on ``k``
training scans per class.

For each task, ``k`` and seed: ``k`` training scans per class (per age tertile for the age
number, :func:`fmrilm.data.instructions.kshot_rows`) become single-question instruction rows;
fresh LoRA adapters on the pretrained export (its fMRI rows train with them) are tuned full
batch with AdamW on the answers, plus the number-token loss on age answers, and exported like
the instruct stage's (:mod:`fmrilm.artifacts.kshot`: one export per adapter and an index of the
scans each was tuned on). ``fmrilm eval`` (``kshot:``) loads each adapter as it loads the
instruct export, and fits FC + linear on the same scans.

A handful of rows per adapter: they are tuned in this process, one after another, without Ray
Train workers (starting those would cost more than the tuning). Re-running the same run keeps
every adapter already written with the same settings and inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from typing import Literal

import pandas as pd
import torch
from pydantic import Field, field_validator

from fmrilm.artifacts import kshot as kshot_artifact
from fmrilm.artifacts import lm as lm_artifact
from fmrilm.config import RunLocation, StageSpec
from fmrilm.data import splits
from fmrilm.data.instructions import REGRESSION, answerable, encode_rows, fit_labeller, kshot_rows, with_descriptions
from fmrilm.data.lm_sequences import pack
from fmrilm.data.pipeline import DataSpec, scan_meta
from fmrilm.errors import UserError
from fmrilm.models.fmri_lm import forward_loss, probe_logits
from fmrilm.models.lora import LoraSpec, add_adapters
from fmrilm.models.number_loss import number_objective
from fmrilm.artifacts.tokens import ScanBlocks

log = logging.getLogger("fmrilm.kshot")


class KShotSpec(StageSpec):
    """Spec of ``jobs/kshot.yaml``."""

    kind: Literal["kshot"] = "kshot"
    model: str = Field("./fmrilm-data/runs/pretrain/model", description="the pretrained LM export the adapters start from")
    tokens: str | None = Field(None, description="tokens table URI (default: beside the export's tokenizer)")
    data: DataSpec = DataSpec()
    tasks: list[str] = ["sex", "age_bin", "age"]
    k: list[int] = Field([1, 2, 4, 8, 16], description="training scans per class (per age tertile for the age number)")
    seeds: list[int] = Field([0, 1], description="one adapter per seed: which scans, which paraphrases, the adapters' init")
    steps: int = Field(100, ge=1, description="full-batch AdamW steps (a handful of examples needs many to be fitted)")
    lr: float = Field(3e-3, gt=0)
    number_loss: float = Field(1.0, ge=0, description="weight of the number-token loss on age answers (as in instruct)")
    lora: LoraSpec = LoraSpec(enabled=True, r=8, alpha=16, dropout=0.0)
    fmri_steps: int = Field(4, ge=1, description="time steps of each scan's fMRI block in a prompt (evaluation asks the same way)")
    descriptions: bool = Field(False, description="each scan's description (first caption) after its fMRI block, as in instruct")
    seq_len: int = Field(512, ge=32)
    run: RunLocation = RunLocation(name="kshot")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v):
        return answerable(v, "k-shot")

    @field_validator("k")
    @classmethod
    def _k(cls, v):
        if not v or min(v) < 1:
            raise ValueError(f"k must list scans per class, each >= 1 (got {v})")
        return v


def location(spec: KShotSpec) -> str:
    """URI of the adapter set this spec writes."""
    from fmrilm import storage

    return storage.join(spec.run.storage, spec.run.name)


def check(spec: KShotSpec) -> dict:
    """Checks before tuning: the export exists, LoRA targets exist, the datasets match its input
    contract; returns its meta."""
    from fmrilm.train.lm import check_inputs

    meta = lm_artifact.check_tunable(spec.model, spec.lora, spec.seq_len)
    check_inputs(meta.get("contract"), spec.data.root, spec.data.datasets, f"the export {spec.model}")
    return meta


def settings_key(spec: KShotSpec, versions: dict) -> str:
    """What an adapter depends on besides its task, k and seed: the spec's tuning settings and the
    dataset versions (an adapter written under another key is tuned again)."""
    fields = spec.model_dump(mode="json", exclude={"kind", "tasks", "k", "seeds", "run"})
    return hashlib.sha256(json.dumps({"spec": fields, "versions": versions}, sort_keys=True).encode()).hexdigest()[:16]


def prepare(spec: KShotSpec, base_meta: dict):
    """The training scans (with tokens) and what tuning reads: ``(train, labeller, blocks,
    descriptions, meta)``, after checking that no subject held out of training trained the export."""
    from fmrilm.features.store import first_captions, read_captions

    base_split = base_meta.get("split")
    meta = scan_meta(spec.data.root, spec.data.datasets, splits.inherited(spec.data.split, base_split))
    splits.check_unseen(splits.subject_keys(meta, ("val", "test")), base_split, "held out", f"the pretrained export {spec.model}")
    blocks = ScanBlocks(spec.model, spec.data.root, spec.data.datasets, spec.tokens)
    meta = meta[meta["scan_id"].isin(blocks.codes)].copy()
    labeller = fit_labeller(meta)
    train = meta[meta["split"] == "train"]
    if train.empty:
        raise UserError(f"k-shot: the training split of {spec.data.root} has no scan with tokens")
    descriptions = first_captions(read_captions(spec.data.root, spec.data.datasets)) if spec.descriptions else {}
    return train, labeller, blocks, descriptions, meta


def tune(model_uri: str, rows: pd.DataFrame, blocks, spec: KShotSpec, seed: int):
    """Fresh LoRA adapters (the fMRI rows train with them) on the export at ``model_uri``, tuned
    full batch on the instruction ``rows`` (``scan_id, prompt, answer, task``; loss on the
    answers, plus the number-token loss on age answers); returns ``(model, tokenizer, meta,
    packed arrays, final loss)`` with the model in eval mode."""
    torch.manual_seed(seed)
    model, tok, meta = lm_artifact.load_model(model_uri)
    if spec.lora.enabled:
        model = add_adapters(model, spec.lora, meta.get("vocab"))
    examples, _ = encode_rows(rows, blocks, tok, spec.fmri_steps, spec.seq_len)
    if not examples:
        raise UserError(f"k-shot: no instruction row fits seq_len={spec.seq_len}: raise seq_len or lower fmri_steps")
    arrays = pack(examples, spec.seq_len, tok.pad_token_id)
    number = number_objective(arrays, tok, 0, spec.number_loss, part=1) if set(rows["task"]) <= set(REGRESSION) else None
    packed = {k: torch.from_numpy(v) for k, v in arrays.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr)
    model.train()
    for _ in range(spec.steps):
        loss, _ = forward_loss(model, packed, {0: 1.0}, number)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok, meta, arrays, float(loss.detach())


def export(model, tok, base_meta: dict, spec: KShotSpec, target: str, arrays: dict, extra: dict) -> None:
    """Write one adapter's export at ``target`` (the instruct layout, ``stage: kshot``, with its
    probe row and logits); ``extra`` joins its ``fmri_lm.json``."""
    from fmrilm.models.fmri_lm import FMRIInputLM
    from fmrilm.train.lm import probe_row

    probe = probe_row(arrays)
    with torch.no_grad():
        logits = probe_logits(model, probe)
    lm = model.lm if isinstance(model, FMRIInputLM) else model
    with tempfile.TemporaryDirectory(prefix="fmrilm-kshot-") as d:
        layout = lm_artifact.save_tuned(d, lm, tok, spec.lora.enabled)
        meta = {k: base_meta[k] for k in lm_artifact.TUNED_KEYS if k in base_meta}
        meta |= {"layout": layout, "base_model": spec.model, "lora": spec.lora.enabled, "seq_len": spec.seq_len, "stage": "kshot",
                 "fmri_steps": spec.fmri_steps, "descriptions": spec.descriptions} | extra
        lm_artifact.write_folder(d, target, meta, model, probe, logits)


def run(spec: KShotSpec) -> dict:
    """Tune (or keep) every adapter of ``tasks x k x seeds`` and write the index; returns
    ``{"run", "index", "adapters", "tuned", "kept", "losses"}``."""
    from fmrilm import runtime

    base_meta = check(spec)
    train, labeller, blocks, descriptions, meta = prepare(spec, base_meta)
    versions = meta.attrs.get("versions") or {}
    key = settings_key(spec, versions)
    where = location(spec)
    policy, upstream = splits.inherited(spec.data.split, base_meta.get("split")), [r for r in [base_meta.get("split")] if r]
    plan = [(task, k, seed) for task in spec.tasks for k in spec.k for seed in spec.seeds]
    adapters, losses, kept = [], {}, 0
    with runtime.progress() as bar:
        progress = bar.add_task("k-shot adapters", total=len(plan))
        for task, k, seed in plan:
            rows = kshot_rows(task, train, labeller, k, seed)
            if rows.empty:
                log.warning("k-shot %s: no training scan has an answer; skipped", task)
                bar.advance(progress)
                continue
            rows = rows.assign(prompt=[with_descriptions(p, descriptions) for p in rows["prompt"]])
            target = kshot_artifact.adapter_location(where, task, k, seed)
            entry = {"task": task, "k": k, "seed": seed, "model": target, "scan_ids": sorted(rows["scan_id"]), "train_rows": len(rows)}
            if _written(target, key, entry["scan_ids"]):
                kept += 1
            else:
                model, tok, _, arrays, loss = tune(spec.model, rows, blocks, spec, seed)
                losses[f"{task}-k{k}-seed{seed}"] = loss
                export(model, tok, base_meta, spec, target, arrays,
                       {"tasks": {task: 1.0}, "kshot": {"key": key, "task": task, "k": k, "seed": seed, "scan_ids": entry["scan_ids"]},
                        "split": splits.record(policy, train[train["scan_id"].isin(rows["scan_id"])], upstream, versions)})
            adapters.append(entry)
            bar.advance(progress)
    tuned = train[train["scan_id"].isin({s for a in adapters for s in a["scan_ids"]})]
    record = splits.record(policy, tuned, upstream, versions)
    index = {"base_model": spec.model, "key": key, "split": record, "adapters": adapters, "fmri_steps": spec.fmri_steps,
             "age_cuts": list(labeller.age_cuts) if labeller.age_cuts else None, "classes": labeller.classes}
    uri = kshot_artifact.write_index(where, index)
    return {"run": where, "index": uri, "adapters": len(adapters), "tuned": len(adapters) - kept, "kept": kept, "losses": losses}


def _written(target: str, key: str, scan_ids: list[str]) -> bool:
    """Whether the export at ``target`` is this adapter, tuned under ``key`` on ``scan_ids``."""
    try:
        done = lm_artifact.export_meta(target).get("kshot") or {}
    except lm_artifact.ExportMissing:
        return False
    return done.get("key") == key and done.get("scan_ids") == scan_ids


def summary(result: dict) -> list[str]:
    """Lines a person reads after a run."""
    losses = ", ".join(f"{k} {v:.3f}" for k, v in result["losses"].items())
    return [f"k-shot adapters: {result['adapters']} ({result['tuned']} tuned, {result['kept']} kept) -> {result['index']}"]\
        + ([f"  final loss: {losses}"] if losses else [])
