"""Vision-language models (Hugging Face image-text-to-text) asked about a scan shown as an image.

The family (``config.model_type``) decides how images reach the processor and where LoRA goes:
adapters sit on the language model's attention and MLP projections only (the vision tower and
projector stay frozen), matched by one regular expression that skips every module whose path names
the vision side. The prompt is the processor's own chat template (one user turn: the image, then
the question; the answer is the assistant's turn), so a real checkpoint is asked the way it was
trained. Built-in tiny models (``tiny-llava``, ``tiny-idefics3``) are built from configs in code
with the offline word-piece tokenizer: tests and the synthetic comparison only, not pretrained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from fmrilm.models.fmri_lm import BackboneError, minilm_tokenizer

log = logging.getLogger("fmrilm.vlm")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_SIDE = ("vision", "visual", "multi_modal_projector", "connector", "patch_embed")  # module paths LoRA never enters


@dataclass(frozen=True)
class Family:
    """How one VLM family takes its inputs: ``nested_images`` (the processor wants a list of
    images per prompt), ``flat_images`` (its pixel inputs are patches of every image of a batch
    concatenated, with a grid per image), ``needs`` (a package its processor imports)."""

    nested_images: bool = False
    flat_images: bool = False
    needs: str | None = None


FAMILIES: dict[str, Family] = {
    "llava": Family(),
    "llava_next": Family(),
    "idefics3": Family(nested_images=True),
    "smolvlm": Family(nested_images=True),
    "mllama": Family(nested_images=True),
    "qwen2_vl": Family(flat_images=True, needs="torchvision"),
    "qwen2_5_vl": Family(flat_images=True, needs="torchvision"),
}
BUILTIN = ("tiny-llava", "tiny-idefics3")
PER_TOKEN = ("attention_mask", "cross_attention_mask")  # processor outputs with one entry per prompt token (dim 0 after the batch)
DROPPED = ("token_type_ids", "input_ids")  # text-only outputs the model does not take (ids are carried as ``ids``)
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
                 "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def family_of(model_or_config) -> Family:
    """The :class:`Family` of a model or config; a clear error for an unsupported family."""
    config = getattr(model_or_config, "config", model_or_config)
    name = config.model_type
    if name not in FAMILIES:
        raise BackboneError(f"VLM family {name!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[name]


def lora_pattern(targets: list[str] | None = None) -> str:
    """peft ``target_modules`` as one regular expression: the language model's ``targets`` (default:
    attention and MLP projections), never a module on the vision side."""
    names = "|".join(targets or PROJECTIONS)
    return rf"^(?!.*({'|'.join(VISION_SIDE)})).*\.({names})$"


def language_targets(model, targets: list[str] | None = None) -> list[str]:
    """The module paths :func:`lora_pattern` selects in ``model``; a clear error when none."""
    import re

    pattern = re.compile(lora_pattern(targets))
    found = [n for n, _ in model.named_modules() if pattern.match(n)]
    if not found:
        raise BackboneError(f"no language-model modules named {list(targets or PROJECTIONS)} in this {model.config.model_type} "
                            "model: set lora.target_modules")
    return found


def tiny_vlm(name: str, seed: int = 0, image_size: int = 32):
    """A built-in tiny VLM and its processor, from configs in code (random weights): ``tiny-llava``
    (a CLIP vision tower, a projector, a llama decoder) or ``tiny-idefics3`` (a SigLIP tower, a
    pixel-shuffle connector, a llama decoder; SmolVLM's family). Images are ``image_size`` square
    per view."""
    from transformers import (CLIPImageProcessor, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    tok = minilm_tokenizer()
    text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    if name == "tiny-llava":
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        patch = image_size // 4
        images = CLIPImageProcessor(size={"height": image_size, "width": image_size}, do_center_crop=False, do_resize=True)
        processor = LlavaProcessor(image_processor=images, tokenizer=tok, chat_template=CHAT_TEMPLATE, patch_size=patch,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
        config = LlavaConfig(vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, image_size=image_size, patch_size=patch),
                             text_config=text | {"vocab_size": len(tok)}, image_token_id=tok.convert_tokens_to_ids("<image>"),
                             vision_feature_select_strategy="default")
        return LlavaForConditionalGeneration(config), processor
    if name == "tiny-idefics3":
        tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]})
        images = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": image_size},
                                        max_image_size={"longest_edge": image_size})
        processor = Idefics3Processor(image_processor=images, tokenizer=tok, chat_template=CHAT_TEMPLATE, image_seq_len=4)
        config = Idefics3Config(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                                   image_size=image_size, patch_size=image_size // 4),
                                text_config=text | {"vocab_size": len(tok)}, image_token_id=tok.convert_tokens_to_ids("<image>"),
                                scale_factor=2)
        return Idefics3ForConditionalGeneration(config), processor
    raise BackboneError(f"no built-in VLM {name!r}; built-ins: {list(BUILTIN)}")


def _path(source: str, cache_dir: str | None) -> tuple[str, str]:
    """``(kind, local folder or hub id)`` of a non-built-in VLM source."""
    from fmrilm.models.fmri_lm import backbone_path, locate_backbone

    kind, _ = locate_backbone(source)
    if kind in ("builtin", "offline"):
        raise BackboneError(f"VLM {source}: a text-only LM; use an image-text-to-text model ({', '.join(BUILTIN)}, a folder, a URI)")
    return kind, backbone_path(source, cache_dir)


def load_processor(source: str, image_size: int = 32, cache_dir: str | None = None):
    """A VLM's processor and config without its weights (what the driver needs to encode rows and
    check LoRA targets): ``(processor, config, info)`` with ``info`` = ``{"source", "family",
    "pretrained"}``. The family is checked before anything large is read; the processor's
    tokenizer always has a pad token."""
    from transformers import AutoConfig, AutoProcessor

    if source in BUILTIN:
        model, processor = tiny_vlm(source, 0, image_size)
        config, pretrained = model.config, False
    else:
        kind, path = _path(source, cache_dir)
        hint = " (hub ids need network access; use a local folder or an s3:// copy offline)" if kind == "hub" else ""
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise BackboneError(f"VLM {source}: cannot read its config: {err}{hint}") from err
        family = family_of(config)
        if family.needs:
            import importlib.util

            if importlib.util.find_spec(family.needs) is None:
                raise BackboneError(f"VLM {source}: the {config.model_type} processor needs {family.needs}: install it")
        try:
            processor = AutoProcessor.from_pretrained(path)
        except (OSError, ValueError, AttributeError) as err:
            raise BackboneError(f"VLM {source}: cannot load its processor: {err}{hint}") from err
        pretrained = True
    tok = processor.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return processor, config, {"source": source, "family": config.model_type, "pretrained": pretrained}


def load_vlm(source: str, seed: int = 0, image_size: int = 32, cache_dir: str | None = None):
    """A VLM with its weights and its processor from a built-in name (seeded random weights), a
    local folder, an ``s3://`` copy (synced once per node) or a hub id: ``(model, processor,
    info)`` (see :func:`load_processor`)."""
    from transformers import AutoModelForImageTextToText

    if source in BUILTIN:
        model, processor = tiny_vlm(source, seed, image_size)
        log.warning("VLM %s: built from a config in code, NOT pretrained (tests and the synthetic comparison only)", source)
        return model, processor, {"source": source, "family": model.config.model_type, "pretrained": False}
    processor, _, info = load_processor(source, image_size, cache_dir)
    _, path = _path(source, cache_dir)
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, torch_dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise BackboneError(f"VLM {source}: cannot load an image-text-to-text model: {err}") from err
    return model, processor, info


def skeleton(config):
    """The model of ``config`` on the meta device (no weights): its module names, for LoRA checks."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def prompt_text(processor, question: str) -> str:
    """The chat-template text of one user turn (the image, then ``question``) ending where the
    assistant's answer starts."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def prompt_inputs(processor, family: Family, image, question: str) -> dict[str, np.ndarray]:
    """The processor's inputs of one prompt, the batch dimension dropped: ``ids [L]``, the per-token
    arrays (``attention_mask [L]``, ...) and the pixel inputs."""
    images = [[image]] if family.nested_images else [image]
    out = processor(text=[prompt_text(processor, question)], images=images, return_tensors="np")
    ids = np.asarray(out["input_ids"])[0].astype(np.int64)
    tok = processor.tokenizer
    # what the tokenizer adds around any text, where the template already has it or it cannot be: a second
    # beginning-of-sequence (a template that writes its own), an end of sequence before the answer (word-piece's [SEP])
    start = 1 if len(ids) > 1 and tok.bos_token_id is not None and ids[0] == ids[1] == tok.bos_token_id else 0
    stop = len(ids) - 1 if tok.eos_token_id is not None and ids[-1] == tok.eos_token_id else len(ids)
    arrays = {k: np.asarray(v)[0][start:stop] if k in PER_TOKEN else np.asarray(v)[0] for k, v in out.items() if k not in DROPPED}
    return {"ids": ids[start:stop], **arrays}


def encode(processor, family: Family, image, question: str, answer: str | None, seq_len: int | None, objective: int = 0) -> dict[str, np.ndarray]:
    """One training row: the prompt's inputs with the answer's tokens (and end of sequence)
    appended, padded to ``seq_len`` (``None``: not padded); ``targets [seq_len]`` holds at each position the next token
    where it is an answer token (else -100), ``objective [seq_len]`` the ``objective`` id there
    (else -1). Raises ``ValueError`` when the row does not fit."""
    tok = processor.tokenizer
    row = prompt_inputs(processor, family, image, question)
    prompt = len(row["ids"])
    tail = np.asarray(tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], np.int64) if answer else np.zeros(0, np.int64)
    length = prompt + len(tail)
    if seq_len is not None and length > seq_len:
        raise ValueError(f"a prompt of {length} tokens does not fit seq_len {seq_len}")
    pad = 0 if seq_len is None else seq_len - length
    out = {}
    for k, v in row.items():
        if k == "ids":
            out[k] = np.concatenate([v, tail, np.full(pad, tok.pad_token_id, np.int64)])
        elif k in PER_TOKEN:
            answer_part = np.repeat(v[-1:], len(tail), axis=0)  # the answer sees what the prompt's last token saw
            out[k] = np.concatenate([v, answer_part, np.zeros((pad, *v.shape[1:]), v.dtype)])
        else:
            out[k] = v
    targets = np.full(length + pad, -100, np.int64)
    targets[prompt - 1 : length - 1] = tail
    out["targets"] = targets
    out["objective"] = np.where(targets != -100, objective, -1).astype(np.int64)
    return out


def model_inputs(batch: dict[str, torch.Tensor], family: Family) -> dict[str, torch.Tensor]:
    """A batch of encoded rows as the model's keyword inputs (patch-list families get one
    concatenated patch list)."""
    out = {"input_ids": batch["ids"]}
    for k, v in batch.items():
        if k in ("ids", "targets", "objective"):
            continue
        out[k] = v.flatten(0, 1) if family.flat_images and k in ("pixel_values", "image_grid_thw") else v
    return out


def vlm_loss(family: Family):
    """The loss of a batch of encoded rows: ``loss(model, batch, weights, number=None) -> (total,
    {objective: loss})``, per-objective mean cross-entropies of the answer tokens (the shared LM
    loop's signature; ``number`` is not used). The vocabulary projection is computed only at the
    positions where some row has a target (every supported family takes ``logits_to_keep``)."""
    from fmrilm.models.fmri_lm import objective_losses

    def loss(model, batch: dict[str, torch.Tensor], weights: dict[int, float], number=None):
        keep = (batch["targets"] != -100).any(0).nonzero().flatten()  # the head only where some row has a target
        if keep.numel() == 0:
            keep = keep.new_zeros(1)
        logits = model(**model_inputs(batch, family), use_cache=False, logits_to_keep=keep).logits
        return objective_losses(logits, batch["targets"][:, keep], batch["objective"][:, keep], weights)

    return loss


@torch.no_grad()
def answer_logprobs(model, family: Family, processor, image, question: str, choices: list[str]) -> np.ndarray:
    """The summed log-probability of each of ``choices`` as the answer ``[len(choices)]``."""
    out = []
    for choice in choices:
        batch = {k: torch.from_numpy(v)[None] for k, v in encode(processor, family, image, question, choice, None).items()}
        logits = model(**model_inputs(batch, family), use_cache=False).logits.float()
        keep = batch["targets"] != -100
        logp = torch.log_softmax(logits[keep], -1).gather(-1, batch["targets"][keep][:, None])
        out.append(float(logp[:-1].sum()))  # the choice's tokens; not the end of sequence after it
    return np.asarray(out)


@torch.no_grad()
def generate_answer(model, family: Family, processor, image, question: str, max_new_tokens: int = 6) -> str:
    """The model's greedy answer to ``question`` about ``image``, decoded to text."""
    row = prompt_inputs(processor, family, image, question)
    batch = model_inputs({k: torch.from_numpy(v)[None] for k, v in row.items()}, family)
    tok = processor.tokenizer
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(row["ids"]):], skip_special_tokens=True).strip()
