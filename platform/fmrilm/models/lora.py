"""LoRA adapters (peft) on a causal LM: the spec, each family's default targets, and wrapping
(the fMRI vocabulary's embedding rows can train beside the adapters)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from annotated_types import Ge, Lt

from fmrilm.models.fmri_lm import BackboneError, FMRIInputLM

LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters (peft). The fMRI token rows of the embeddings stay trainable. A plain
    dataclass: the job spec (``lora:``) validates it."""

    enabled: bool = False
    r: Annotated[int, Ge(1)] = 16
    alpha: Annotated[int, Ge(1)] = 32
    dropout: Annotated[float, Ge(0), Lt(1)] = 0.05
    target_modules: list[str] | None = None  # default: attention + MLP projections of the family


def lora_targets(lora: LoraSpec, model) -> list[str]:
    """The LoRA target module names, checked against ``model``; a clear error if any is absent."""
    family = model.config.model_type
    targets = lora.target_modules or LORA_TARGETS.get(family)
    if not targets:
        raise BackboneError(f"no default LoRA targets for model family {family!r}: set lora.target_modules")
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaves]
    if missing:
        sample = sorted(n for n in leaves if n)[:12]
        raise BackboneError(f"lora.target_modules {missing} are not modules of this {family} model (it has e.g. {sample})")
    return targets


def wrap_lora(lora: LoraSpec, model, new_ids: list[int] | None = None):
    """LoRA on the family's projections; with ``new_ids`` those rows of the embeddings (and of an
    untied head) train too (the fMRI vocabulary during pretraining)."""
    from peft import LoraConfig, get_peft_model

    tokens = None
    if new_ids:
        tokens = {_module_name(model, model.get_input_embeddings()): new_ids}
        head = model.get_output_embeddings()
        if head is not None and head.weight is not model.get_input_embeddings().weight:
            tokens[_module_name(model, head)] = new_ids
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                     target_modules=lora_targets(lora, model), trainable_token_indices=tokens)
    return get_peft_model(model, cfg)


def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module).rsplit(".", 1)[-1]


def add_adapters(model, lora: LoraSpec, vocab: dict | None = None):
    """Fresh LoRA adapters on an LM (inside the fMRI input wrapper, whose projectors keep training);
    with ``vocab`` (an export's ``fmri_lm.json`` vocabulary) the fMRI rows of the embeddings train
    too, so the codes' meaning can adapt to the answers."""
    new_ids = None
    if vocab:
        new_ids = [vocab["open_id"], vocab["close_id"], *range(vocab["first_code_id"], vocab["first_code_id"] + vocab["num_codes"])]
    if isinstance(model, FMRIInputLM):
        model.lm = wrap_lora(lora, model.lm, new_ids)
        return model
    return wrap_lora(lora, model, new_ids)
