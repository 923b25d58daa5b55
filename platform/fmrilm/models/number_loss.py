"""A regression loss on number tokens, so an LM answering a number learns that 47 is nearer 48
than 80 (cross-entropy alone treats every number token as an unrelated class).

At every answer position whose target is a number token, the model's probabilities over the
number tokens (renormalised over them) give an expected value; the loss is its squared error
against the target's value, in units of ``scale`` (the Number Token Loss, NTL-MSE, of Zausinger
et al. 2024), plus the negative log of the probability mass on number tokens (so the answer is
a number at all, not another task's answer or the end token, whatever number it is). A
tokenizer with whole numbers as tokens (``" 47"``) regresses the number itself; one that splits
digits (``"4"``, ``"7"``) regresses each digit, as in NTL. Pure torch, no state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

WHOLE = re.compile(r"^\d{1,3}$")


@dataclass(frozen=True)
class NumberTokens:
    """Number tokens of a vocabulary: ``ids [c]`` and their ``values [c]``; ``scale`` is the
    spread of the values the loss is measured in (squared error / scale**2)."""

    ids: tuple[int, ...]
    values: tuple[float, ...]
    scale: float

    def as_dict(self) -> dict:
        return {"ids": list(self.ids), "values": list(self.values), "scale": self.scale}


@dataclass(frozen=True)
class NumberObjective:
    """The number-token loss on the answers of one objective (``objective``: its id in the packed
    ``objective`` array), added ``weight`` times to the loss and reported as part ``part``."""

    objective: int
    tokens: NumberTokens
    weight: float
    part: int

    @classmethod
    def from_dict(cls, d: dict) -> "NumberObjective":
        t = d["tokens"]
        return cls(d["objective"], NumberTokens(tuple(t["ids"]), tuple(t["values"]), t["scale"]), d["weight"], d["part"])

    def as_dict(self) -> dict:
        return {"objective": self.objective, "tokens": self.tokens.as_dict(), "weight": self.weight, "part": self.part}


def number_tokens(tokenizer, target_ids: np.ndarray) -> NumberTokens | None:
    """The number tokens among ``target_ids`` (every answer token of a regression task, repeats
    kept, ``[n]``): tokens that decode to a whole number of at most three digits, with ``scale``
    the standard deviation of their values over ``target_ids`` (at least 1). ``None`` when fewer
    than two distinct number tokens occur (nothing to regress)."""
    values: dict[int, float] = {}
    for t in np.unique(np.asarray(target_ids, np.int64)):
        text = tokenizer.decode([int(t)]).strip()
        if WHOLE.match(text):
            values[int(t)] = float(text)
    if len(values) < 2:
        return None
    seen = [values[int(t)] for t in np.asarray(target_ids, np.int64) if int(t) in values]
    ids = sorted(values)
    return NumberTokens(tuple(ids), tuple(values[i] for i in ids), max(1.0, float(np.std(seen))))


def number_objective(packed: dict[str, np.ndarray], tokenizer, objective: int, weight: float, part: int) -> NumberObjective | None:
    """The number-token loss on the answers of ``objective`` in packed rows (``targets``,
    ``objective [rows, L]``), reported as part ``part``; ``None`` with ``weight`` 0 or fewer than
    two distinct number tokens among those answers."""
    tokens = number_tokens(tokenizer, packed["targets"][(packed["objective"] == objective) & (packed["targets"] >= 0)])
    if weight == 0 or tokens is None:
        return None
    return NumberObjective(objective=objective, tokens=tokens, weight=weight, part=part)


def number_token_loss(logits: torch.Tensor, targets: torch.Tensor, numbers: NumberTokens) -> torch.Tensor | None:
    """Mean squared error, in units of ``numbers.scale``, between the expected value of the number
    tokens under ``logits [n, vocab]`` and the value of ``targets [n]``, plus the mean of
    ``-log P(a number token)``, over the positions whose target is a number token; ``None`` when
    there is none."""
    ids = torch.tensor(numbers.ids, device=logits.device)
    values = torch.tensor(numbers.values, device=logits.device, dtype=torch.float32)
    lookup = torch.full((logits.shape[-1],), -1, dtype=torch.long, device=logits.device)
    lookup[ids] = torch.arange(len(ids), device=logits.device)
    where = lookup[targets.clamp(min=0)]
    sel = (targets >= 0) & (where >= 0)
    if not sel.any():
        return None
    logp = torch.log_softmax(logits[sel].float(), -1)
    number_logp = logp[:, ids]
    mass = torch.logsumexp(number_logp, -1)  # log of the probability that the answer is a number at all
    p = torch.softmax(number_logp, -1)
    err = (p @ values - values[where[sel]]) / numbers.scale
    return (err**2).mean() - mass.mean()
