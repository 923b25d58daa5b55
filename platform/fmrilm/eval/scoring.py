"""Answering instructions with a trained LM: constrained scoring and number generation.

Classification compares the log-likelihood of each allowed answer after the prompt (summed over
the answer's tokens) and picks the highest, so the model can only answer with a valid class
(fMRI-LM's constrained decoding); :func:`calibrated_choices` first removes each answer's mean
score over the same question asked about training scans, so a model's constant preference for
one answer (an uncalibrated bias) does not decide every scan. Regression greedily generates a few tokens after the prompt
and parses the first number; an unparsable answer is counted and replaced by a fallback value.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from fmrilm.data.lm_sequences import IGNORE, Example, attention_mask, compose, pack

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _with_groups(prompt: Example, answer_ids: np.ndarray) -> Example:
    """``prompt`` (its block-causal groups and encoder features kept) followed by ``answer_ids``
    as targets (no end token)."""
    block = ("fmri", prompt.ids, np.full(len(prompt), IGNORE, np.int64), prompt.groups - prompt.groups.min(),
             {"feats": prompt.feats, "roi": prompt.roi} if prompt.feats is not None else {})
    return compose([block, ("answer", np.asarray(answer_ids, np.int64))], 0)


@torch.no_grad()
def sequence_logprobs(model, examples: list[Example], seq_len: int, pad_id: int, batch_size: int = 8) -> np.ndarray:
    """Sum of ``log p(target)`` over the target tokens of each example, ``[n]``."""
    if not examples:
        return np.zeros(0)
    packed = pack(examples, seq_len, pad_id)
    out, k = np.zeros(len(examples)), 0  # pack fills rows with whole examples in order: segment s of row r is the next one
    for start in range(0, len(packed["ids"]), batch_size):
        batch = {key: torch.from_numpy(v[start : start + batch_size]) for key, v in packed.items()}
        extra = {"feats": batch["feats"], "roi": batch["roi"]} if "feats" in batch else {}
        logits = model(input_ids=batch["ids"], attention_mask=attention_mask(batch["segments"], batch["groups"]),
                       position_ids=batch["positions"], use_cache=False, **extra).logits.float()
        targets = batch["targets"]
        logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        logp = torch.where(targets != IGNORE, logp, torch.zeros_like(logp))
        for r in range(len(targets)):
            for s in range(1, int(batch["segments"][r].max()) + 1):
                out[k] = float(logp[r][batch["segments"][r] == s].sum())
                k += 1
    assert k == len(examples)
    return out


def score_choices(model, prompts: list[Example], choices: list[str], tokenizer, seq_len: int) -> np.ndarray:
    """Log-likelihood of every allowed answer after every prompt, ``[prompts, choices]``."""
    ids = [np.asarray(tokenizer(c, add_special_tokens=False)["input_ids"], np.int64) for c in choices]
    examples = [_with_groups(p, a) for p in prompts for a in ids]
    return sequence_logprobs(model, examples, seq_len, tokenizer.pad_token_id).reshape(len(prompts), len(choices))


def calibrated_choices(scores: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """The chosen answer's index per row of ``scores [n, choices]``: the argmax after subtracting
    each answer's mean score over ``reference [m, choices]`` (the same prompts on training scans);
    the plain argmax when there is no reference."""
    scores = np.asarray(scores, float)
    if reference is None or len(reference) == 0:
        return scores.argmax(1)
    return (scores - np.asarray(reference, float).mean(0)).argmax(1)


@torch.no_grad()
def generate(model, prompt: Example, max_new_tokens: int, eos_id: int) -> list[int]:
    """Greedy continuation of a prompt (the block-causal mask kept); returns the new token ids."""
    new: list[int] = []
    for _ in range(max_new_tokens):
        ex = _with_groups(prompt, np.asarray(new + [eos_id], np.int64))  # the placeholder's logits are never read
        n = len(prompt) + len(new)
        batch = {k: torch.from_numpy(v[None, :n]) for k, v in
                 {"ids": ex.ids, "groups": ex.groups, "positions": ex.positions, "segments": np.ones(len(ex), np.int32)}.items()}
        extra = {}
        if ex.feats is not None:
            extra = {"feats": torch.from_numpy(ex.feats[None, :n]), "roi": torch.from_numpy(ex.roi[None, :n])}
        logits = model(input_ids=batch["ids"], attention_mask=attention_mask(batch["segments"], batch["groups"]),
                       position_ids=batch["positions"], use_cache=False, **extra).logits
        token = int(logits[0, -1].argmax())
        if token == eos_id:
            break
        new.append(token)
    return new


def parse_number(text: str) -> float | None:
    """The first number in ``text``, or ``None``."""
    m = NUMBER.search(text.replace(",", ""))
    return float(m.group()) if m else None


def predict_numbers(model, prompts: list[Example], tokenizer, fallback: float, max_new_tokens: int = 4) -> tuple[np.ndarray, float]:
    """Generated numbers for every prompt (``fallback`` where none parses) and the parse rate."""
    values, parsed = [], 0
    for p in prompts:
        v = parse_number(tokenizer.decode(generate(model, p, max_new_tokens, tokenizer.eos_token_id)))
        parsed += v is not None
        values.append(fallback if v is None else v)
    return np.asarray(values, float), parsed / max(1, len(prompts))
