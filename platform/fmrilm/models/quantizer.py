"""Vector quantizer: l2-normalised codebook, EMA updates, k-means init, dead-code restarts.

The k-means initialisation waits until training has shown the quantizer ``init_vectors`` vectors
(by default as many as it has codes; a tokenizer with one token per window sees ``batch`` vectors
a step): until then vectors are coded against the provisional random codebook and nothing is
updated. A ``centered`` quantizer compares directions from the mean of those first vectors (a
buffer fixed at the initialisation) rather than from the origin: inputs whose common part
dominates their length (a window's correlations, mostly the group's connectivity) are told apart
by how they deviate from it; ``scale`` keeps the deviations' mean length.

Codes and inputs live on the unit sphere; the nearest code is the one of highest cosine
similarity. Training updates the codebook by exponential moving averages of assignment counts
and assigned-vector sums (no codebook gradient); under ``torch.distributed`` the counts and sums
are all-reduced, so every worker keeps the same codebook. The encoder gets the commitment loss
``beta * ||z - sg(q)||^2`` and straight-through gradients ``z + sg(q - z)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # [n, dim] straight-through quantized vectors
    codes: torch.Tensor  # [n] int64 code ids
    commitment_loss: torch.Tensor  # scalar
    perplexity: torch.Tensor  # scalar, of this batch's code histogram (all workers)
    used_fraction: torch.Tensor  # scalar, fraction of codes used in this batch (all workers)
    restarted: int  # dead codes restarted in this step


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.broadcast(t, src=0)
    return t


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """``exp(H(p))`` of a code histogram ``[codes]``: 1 when one code is used, K when all are
    used equally."""
    p = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None) -> torch.Tensor:
    """k unit-norm centroids ``[k, dim]`` of unit vectors ``x [n, dim]`` (cosine k-means).

    With fewer vectors than ``k``, vectors are sampled with replacement and jittered.
    """
    n = x.shape[0]
    idx = torch.randperm(n, generator=generator)[:k] if n >= k else torch.randint(n, (k,), generator=generator)
    centroids = x[idx].clone()
    if n < k:
        centroids += 0.01 * torch.randn(centroids.shape, generator=generator)
    centroids = F.normalize(centroids, dim=-1)
    for _ in range(iters):
        assign = (x @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        centroids = torch.where(counts[:, None] > 0, F.normalize(sums, dim=-1), centroids)
    return centroids


class VectorQuantizer(nn.Module):
    """EMA vector quantizer over ``[n, dim]`` inputs; see the module docstring."""

    def __init__(self, num_codes: int, dim: int, beta: float = 1.0, decay: float = 0.99,
                 dead_threshold: float = 1e-3, kmeans_iters: int = 10, eps: float = 1e-5,
                 init_vectors: int | None = None, centered: bool = False):
        super().__init__()
        self.num_codes, self.dim, self.beta, self.decay = num_codes, dim, beta, decay
        self.dead_threshold, self.kmeans_iters, self.eps = dead_threshold, kmeans_iters, eps
        self.init_vectors, self.centered = max(init_vectors or num_codes, num_codes), centered
        self.register_buffer("codebook", F.normalize(torch.randn(num_codes, dim), dim=-1))
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("embed_sum", self.codebook.clone())
        self.register_buffer("usage", torch.zeros(num_codes))  # total assignments seen in training
        self.register_buffer("initialized", torch.tensor(False))
        # subtracted before normalising, and the centred vectors' mean length: set at the initialisation of a centered
        # quantizer (saved only by one: an uncentred quantizer's are constants, and its older checkpoints lack them)
        self.register_buffer("center", torch.zeros(dim), persistent=centered)
        self.register_buffer("scale", torch.ones(()), persistent=centered)
        self._pending: list[torch.Tensor] = []  # training vectors held for the k-means initialisation

    @torch.no_grad()
    def init_codebook(self, z: torch.Tensor) -> None:
        """k-means initialisation from a batch of input vectors ``[n, dim]`` (rank 0's result on
        every rank); a centered quantizer first takes their mean as its centre."""
        z = z.detach().float()
        if self.centered:
            self.center.copy_(_broadcast(z.mean(0).contiguous()))
            self.scale.copy_(_broadcast((z - self.center).norm(dim=-1).mean().reshape(())))
        centroids = spherical_kmeans(self.directions(z).cpu(), self.num_codes, self.kmeans_iters).to(z.device)
        centroids = _broadcast(centroids.contiguous())
        self.codebook.copy_(centroids)
        self.embed_sum.copy_(centroids)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    def directions(self, z: torch.Tensor) -> torch.Tensor:
        """Inputs ``[n, dim]`` as the unit vectors codes are matched against (less the centre)."""
        return F.normalize(z - self.center, dim=-1)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Code ids ``[n]`` of unit vectors ``z [n, dim]`` (highest cosine similarity)."""
        return (z @ self.codebook.T).argmax(dim=-1)

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> int:
        sums = _all_reduce(torch.zeros_like(self.codebook).index_add_(0, codes, z.float()))
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
        self.codebook.copy_(F.normalize(self.embed_sum / smoothed[:, None], dim=-1))
        self.usage.add_(counts)
        return self._restart_dead(z)

    @torch.no_grad()
    def _restart_dead(self, z: torch.Tensor) -> int:
        """Replace codes whose EMA count fell below the threshold with random batch vectors."""
        dead = self.cluster_size < self.dead_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        pick = torch.randint(z.shape[0], (n_dead,), device=z.device)
        fresh = _broadcast(F.normalize(z[pick].float() + 0.01 * torch.randn_like(z[pick].float()), dim=-1).contiguous())
        self.codebook[dead] = fresh
        self.embed_sum[dead] = fresh
        self.cluster_size[dead] = 1.0
        return n_dead

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z [n, dim]`` (as :meth:`directions`); EMA/k-means/restarts only in training."""
        if self.training and not bool(self.initialized):
            self._pending.append(z.detach())
            held = torch.tensor(float(sum(len(p) for p in self._pending)), device=z.device)
            if float(_broadcast(held)) >= self.init_vectors:  # rank 0's count (its vectors are fitted): every rank inits at once
                self.init_codebook(torch.cat(self._pending))
                self._pending = []
        z = self.directions(z)
        codes = self.nearest(z.detach())
        counts = _all_reduce(torch.bincount(codes, minlength=self.num_codes).float())
        restarted = self._ema_update(z.detach(), codes, counts) if self.training and bool(self.initialized) else 0
        q = self.codebook[codes]
        commitment = self.beta * F.mse_loss(z, q.detach())
        quantized = z + (q - z).detach()
        return QuantizerOutput(quantized, codes, commitment, perplexity(counts), (counts > 0).float().mean(), restarted)

    def stats(self) -> dict:
        """Codebook statistics over training: usage counts, used fraction, perplexity, dead codes."""
        return {
            "num_codes": self.num_codes,
            "used_fraction": float((self.usage > 0).float().mean()),
            "perplexity": float(perplexity(self.usage)),
            "dead_codes": int((self.cluster_size < self.dead_threshold).sum()),
            "max_perplexity": float(self.num_codes),
            "entropy_bits": float(math.log2(max(float(perplexity(self.usage)), 1.0))),
        }
