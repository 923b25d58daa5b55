"""The tokenizer's training objective: :class:`~fmrilm.models.tokenizer.FMRITokenizer` plus the
alignment head (:mod:`fmrilm.models.alignment`) as one module, so the gradient-reversal branch runs
inside the same (DDP) forward as the reconstruction."""

from __future__ import annotations

import torch
from torch import nn

from fmrilm.models.alignment import AlignmentConfig, AlignmentHead
from fmrilm.models.tokenizer import FMRITokenizer, TokenizerConfig, r2_per_roi


class TokenizerObjective(nn.Module):
    """Tokenizer + alignment head with one forward that returns every loss term and metric."""

    def __init__(self, cfg: TokenizerConfig, align: AlignmentConfig, text_dim: int):
        super().__init__()
        self.tokenizer = FMRITokenizer(cfg)
        self.align = AlignmentHead(cfg.width, text_dim, align) if align.enabled else None
        self.align_cfg = align

    def forward(self, x, valid, coef: float = 0.0, text_tokens=None, caption_emb=None, caption_mask=None, groups=None) -> dict:
        """``x [batch, rois, window]``, ``valid [batch]`` (padding rows False), gradient-reversal
        ``coef``, text token bank ``[n, text_dim]``, caption embeddings ``[batch, text_dim]`` with
        ``caption_mask [batch]`` and ``groups`` (scan ids: windows of one scan share a caption).
        Returns ``{"loss": scalar, "terms": {name: detached scalar}, "codes": [batch, rois, patches]}``."""
        out = self.tokenizer(x)
        target = self.tokenizer.target(x)
        w = valid.float()
        n = w.sum().clamp_min(1)
        mse = (((out.recon - target) ** 2).mean(dim=(1, 2)) * w).sum() / n / self.tokenizer.target_scale(target, valid)
        loss = mse + out.quant.commitment_loss + self.tokenizer.cfg.spectrum_weight * out.spectrum_loss
        terms = {"recon_mse": mse.detach(), "commitment": out.quant.commitment_loss.detach(), "spectrum": out.spectrum_loss.detach()}
        if self.align is not None and self.align_cfg.domain_weight > 0 and text_tokens is not None:
            dom, acc = self.align.domain_loss(out.features, text_tokens, coef, valid)
            loss = loss + self.align_cfg.domain_weight * dom
            terms |= {"domain_loss": dom.detach(), "domain_acc": acc.detach()}
        if self.align is not None and self.align_cfg.contrastive_weight > 0 and caption_emb is not None:
            con = self.align.contrastive_loss(out.features, caption_emb, groups, caption_mask & valid)
            loss = loss + self.align_cfg.contrastive_weight * con
            terms["contrastive_loss"] = con.detach()
        r2 = r2_per_roi(target, out.recon).mean(dim=1)
        terms |= {"r2": ((r2 * w).sum() / n).detach(), "perplexity": out.quant.perplexity.detach(),
                  "used_fraction": out.quant.used_fraction.detach(), "restarted": torch.tensor(float(out.quant.restarted))}
        return {"loss": loss, "terms": terms, "codes": out.codes}
