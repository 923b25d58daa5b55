"""The neural tokenizer: a VQ autoencoder over ROI x time windows.

``x [batch, rois, time]`` is cut along time into patches of ``patch`` timepoints per ROI
(``[batch, rois, patches, patch]``); each patch is embedded linearly, plus a learned ROI
embedding and a learned temporal-position embedding, and a transformer encoder mixes all
``rois * patches`` tokens. Tokens are projected to the code dimension and quantized; the decoder
(same architecture) reconstructs the normalised signal of every patch, and optionally its
amplitude spectrum (NeuroLM). Any number of ROIs up to ``max_rois`` and of patches up to
``max_patches`` works with the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from pydantic import Field
from torch import nn

from fmrilm.config import Strict
from fmrilm.models.quantizer import QuantizerOutput, VectorQuantizer


class TokenizerConfig(Strict):
    """Sizes of the tokenizer (defaults: a small model that trains on a CPU)."""

    patch: int = Field(16, ge=1, description="timepoints per patch")
    width: int = Field(64, ge=8, description="transformer width")
    depth: int = Field(2, ge=1, description="encoder layers (the decoder has the same)")
    heads: int = Field(4, ge=1)
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    code_dim: int = Field(32, ge=2)
    num_codes: int = Field(512, ge=2)
    beta: float = Field(1.0, ge=0, description="commitment weight")
    ema_decay: float = Field(0.99, gt=0, lt=1)
    dead_threshold: float = 1e-3
    spectrum_weight: float = Field(0.0, ge=0, description="weight of the amplitude-spectrum target (NeuroLM); 0 = off")
    max_rois: int = 512
    max_patches: int = 64


@dataclass
class TokenizerOutput:
    recon: torch.Tensor  # [batch, rois, time]
    codes: torch.Tensor  # [batch, rois, patches]
    features: torch.Tensor  # [batch, rois * patches, width] encoder features (pre-quantization)
    quant: QuantizerOutput
    spectrum_loss: torch.Tensor  # scalar (0 when off)


def _encoder(cfg: TokenizerConfig) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, int(cfg.width * cfg.mlp_ratio), cfg.dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)


class FMRITokenizer(nn.Module):
    """VQ autoencoder over windows; see the module docstring."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"tokenizer width {cfg.width} must be divisible by heads {cfg.heads}")
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.patch, cfg.width)
        self.roi_embed = nn.Embedding(cfg.max_rois, cfg.width)
        self.time_embed = nn.Embedding(cfg.max_patches, cfg.width)
        self.encoder = _encoder(cfg)
        self.enc_norm = nn.LayerNorm(cfg.width)
        self.to_code = nn.Linear(cfg.width, cfg.code_dim)
        self.quantizer = VectorQuantizer(cfg.num_codes, cfg.code_dim, cfg.beta, cfg.ema_decay, cfg.dead_threshold)
        self.from_code = nn.Linear(cfg.code_dim, cfg.width)
        self.decoder = _encoder(cfg)
        self.dec_norm = nn.LayerNorm(cfg.width)
        self.to_patch = nn.Linear(cfg.width, cfg.patch)
        self.to_spectrum = nn.Linear(cfg.width, cfg.patch // 2 + 1) if cfg.spectrum_weight > 0 else None
        nn.init.normal_(self.roi_embed.weight, std=0.02)
        nn.init.normal_(self.time_embed.weight, std=0.02)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, rois, time]`` -> ``[batch, rois, patches, patch]``."""
        b, r, t = x.shape
        p = self.cfg.patch
        if t % p:
            raise ValueError(f"window length {t} is not a multiple of the patch length {p}")
        if r > self.cfg.max_rois or t // p > self.cfg.max_patches:
            raise ValueError(f"{r} ROIs x {t // p} patches exceed max_rois={self.cfg.max_rois} / max_patches={self.cfg.max_patches}")
        return x.reshape(b, r, t // p, p)

    def _positions(self, r: int, n: int, device) -> torch.Tensor:
        rois = self.roi_embed(torch.arange(r, device=device))[:, None, :]
        times = self.time_embed(torch.arange(n, device=device))[None, :, :]
        return (rois + times).reshape(r * n, -1)  # ROI-major token order

    checkpointing = False  # activation checkpointing of every transformer layer while training (set by the training stage)

    def _layers(self, stack: nn.TransformerEncoder, h: torch.Tensor) -> torch.Tensor:
        for layer in stack.layers:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False)
            else:
                h = layer(h)
        return h

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features ``[batch, rois * patches, width]`` of windows ``[batch, rois, time]``."""
        patches = self.patchify(x)
        b, r, n, _ = patches.shape
        tokens = self.patch_embed(patches).reshape(b, r * n, -1) + self._positions(r, n, x.device)
        return self.enc_norm(self._layers(self.encoder, tokens))

    def forward(self, x: torch.Tensor) -> TokenizerOutput:
        """Encode, quantize, decode windows ``[batch, rois, time]``."""
        b, r, t = x.shape
        n = t // self.cfg.patch
        feats = self.encode(x)
        with torch.autocast(x.device.type, enabled=False):  # code search and EMA updates in fp32 under any autocast
            quant = self.quantizer(self.to_code(feats.float()).reshape(b * r * n, -1))
        h = self.from_code(quant.quantized).reshape(b, r * n, -1) + self._positions(r, n, x.device)
        h = self.dec_norm(self._layers(self.decoder, h))
        recon = self.to_patch(h).reshape(b, r, t)
        spectrum_loss = torch.zeros((), device=x.device)
        if self.to_spectrum is not None:
            target = torch.fft.rfft(self.patchify(x), dim=-1).abs()
            pred = self.to_spectrum(h).reshape(target.shape)
            spectrum_loss = F.mse_loss(pred, target)
        return TokenizerOutput(recon, quant.codes.reshape(b, r, n), feats, quant, spectrum_loss)

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Code ids ``[batch, rois, patches]`` of windows ``[batch, rois, time]`` (no updates)."""
        return self.tokenize_with_features(x)[0]

    @torch.no_grad()
    def tokenize_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Code ids ``[batch, rois, patches]`` and encoder features ``[batch, rois, patches, width]``."""
        b, r, t = x.shape
        n = t // self.cfg.patch
        feats = self.encode(x)
        z = F.normalize(self.to_code(feats).reshape(b * r * n, -1), dim=-1)
        return self.quantizer.nearest(z).reshape(b, r, n), feats.reshape(b, r, n, -1)


def r2_per_roi(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """R^2 of each (window, ROI) over time: ``[batch, rois, time]`` x2 -> ``[batch, rois]``."""
    sse = ((x - recon) ** 2).sum(-1)
    sst = ((x - x.mean(-1, keepdim=True)) ** 2).sum(-1)
    return 1 - sse / sst.clamp_min(1e-8)
