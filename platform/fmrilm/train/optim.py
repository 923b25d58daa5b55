"""The optimiser settings every training stage shares: AdamW with a linear warm-up, then cosine decay."""

from __future__ import annotations

import math

import torch
from pydantic import Field

from fmrilm.config import Strict


class OptimSpec(Strict):
    """AdamW with linear warm-up then cosine decay."""

    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints (and validations)")
    log_every: int = Field(10, ge=1, description="steps between metric reports")
    max_steps: int | None = Field(None, ge=0, description="stop after this many steps in total (0: no step, the initialised "
                                  "model is exported: the no-pretraining ablation)")
    seed: int = 0


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
