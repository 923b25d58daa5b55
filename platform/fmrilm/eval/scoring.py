"""Answering instructions with a trained LM: constrained scoring and number generation.

Classification compares the log-likelihood of each allowed answer after the prompt (summed over
the answer's tokens) and picks the highest, so the model can only answer with a valid class
(fMRI-LM's constrained decoding); :func:`calibrated_choices` first removes each answer's mean
score over the same question asked about training scans, so a model's constant preference for
one answer (an uncalibrated bias) does not decide every scan. A number is either decoded under the
same constraint (:func:`expected_numbers`: the mean of the allowed values under the model's
probabilities) or generated greedily and parsed (:func:`predict_numbers`; an unparsable answer is
counted and replaced by a fallback value).
"""

from __future__ import annotations

import re

import numpy as np
import torch

from fmrilm.data.lm_sequences import IGNORE, Example, as_row, attention_mask, compose, pack
from fmrilm.models.fmri_lm import fmri_inputs, target_logits

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _with_groups(prompt: Example, answer_ids: np.ndarray) -> Example:
    """``prompt`` (its block-causal groups and encoder features kept) followed by ``answer_ids``
    as targets (no end token)."""
    extra = {"feats": prompt.feats, "roi": prompt.roi} if prompt.feats is not None else {}
    if prompt.scan is not None:
        extra |= {"scan": prompt.scan, "scan_at": prompt.scan_at}
    block = ("fmri", prompt.ids, np.full(len(prompt), IGNORE, np.int64), prompt.groups - prompt.groups.min(), extra)
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
        logits, keep = target_logits(model, batch, attention_mask=attention_mask(batch["segments"], batch["groups"]))
        logits = logits.float()
        targets = batch["targets"][:, keep]
        logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        logp = torch.where(targets != IGNORE, logp, torch.zeros_like(logp))
        for r in range(len(targets)):
            for s in range(1, int(batch["segments"][r].max()) + 1):
                out[k] = float(logp[r][batch["segments"][r][keep] == s].sum())
                k += 1
    assert k == len(examples)
    return out


@torch.no_grad()
def next_token_logprobs(model, prompts: list[Example], seq_len: int, pad_id: int, batch_size: int = 8) -> np.ndarray:
    """``log p(token | prompt)`` over the whole vocabulary at the end of each prompt, ``[prompts, vocab]``."""
    examples = [_with_groups(p, np.array([pad_id], np.int64)) for p in prompts]  # the placeholder only marks the position
    packed = pack(examples, seq_len, pad_id)
    rows = []
    for start in range(0, len(packed["ids"]), batch_size):
        batch = {key: torch.from_numpy(v[start : start + batch_size]) for key, v in packed.items()}
        logits, keep = target_logits(model, batch, attention_mask=attention_mask(batch["segments"], batch["groups"]))
        logp = torch.log_softmax(logits.float(), -1)
        targets = batch["targets"][:, keep]
        for r in range(len(targets)):  # one target per example, in order
            rows.extend(logp[r][targets[r] != IGNORE].numpy())
    assert len(rows) == len(prompts)
    return np.stack(rows)


def expected_numbers(model, prompts: list[Example], tokenizer, candidates: np.ndarray, seq_len: int) -> np.ndarray:
    """Constrained decoding of a number: each candidate value (``candidates [c]``, e.g. every
    whole age seen in training) is scored as an answer, and the prediction is the mean of the
    candidates under the model's probabilities renormalised over them, ``[prompts]``. Single-token
    candidates are read off one forward pass per prompt."""
    texts = [f" {int(v)}" if float(v).is_integer() else f" {v}" for v in candidates]  # as the instructions write numbers
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if all(len(i) == 1 for i in ids):
        scores = next_token_logprobs(model, prompts, seq_len, tokenizer.pad_token_id)[:, [i[0] for i in ids]]
    else:
        scores = score_choices(model, prompts, texts, tokenizer, seq_len)
    p = np.exp(scores - scores.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return p @ np.asarray(candidates, float)


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
        batch = {k: torch.from_numpy(v) for k, v in as_row(ex, len(prompt) + len(new)).items()}
        logits = model(input_ids=batch["ids"], attention_mask=attention_mask(batch["segments"], batch["groups"]),
                       position_ids=batch["positions"], use_cache=False, **fmri_inputs(batch)).logits
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
