"""Reductions over the ranks of a torch process group (the Ray Train workers of one run), used by
the training loop's losses and the tokenizer's held-out metrics. Without a process group each is
the identity on this process's values."""

from __future__ import annotations

import torch


def sum_across_ranks(values: dict[str, float], device) -> dict[str, float]:
    """``values`` summed over ranks (every rank passes the same keys); the tensor lives on
    ``device``, as NCCL reduces only CUDA tensors."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def mean_across_ranks(sums: dict[str, float], counts: dict[str, float], keys: tuple[str, ...], device) -> dict[str, float]:
    """Means of ``keys`` over every rank's ``sums / counts`` (one fixed-size reduction: ranks may
    have seen different keys); keys no rank counted are left out."""
    total = sum_across_ranks({**{f"sum/{k}": sums.get(k, 0.0) for k in keys}, **{f"count/{k}": counts.get(k, 0.0) for k in keys}}, device)
    return {k: total[f"sum/{k}"] / total[f"count/{k}"] for k in keys if total[f"count/{k}"] > 0}
