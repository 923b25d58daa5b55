"""The neural tokenizer: a VQ autoencoder over ROI x time windows.

``x [batch, rois, time]`` is cut along time into patches of ``patch`` timepoints per ROI
(``[batch, rois, patches, patch]``). Codes are ``[batch, channels, patches]``; two layouts:

* ``roi`` (NeuroLM / fMRI-LM): one token per ROI and patch (``channels = rois``). Each patch is
  embedded linearly, plus a learned ROI embedding and a temporal-position embedding, and a
  transformer encoder mixes all ``rois * patches`` tokens. A code describes one ROI's waveform;
  the coupling between regions lives only in which codes co-occur.
* ``state``: one token per patch for the whole brain (``channels = 1``), a brain-state code. A
  set encoder weights every ROI's patch embedding by a learned vector of that ROI and sums over
  ROIs (any number of ROIs), a transformer mixes the patches along time; the decoder reads each
  ROI out of the state with a second learned vector per ROI. A code names a
  whole-brain pattern, so the coupling between regions is in each code and the histogram of a
  scan's codes carries its connectivity; the order of the codes carries the dynamics.
* ``connectivity``: one token per window for the window's coupling (``channels = 1``, one patch:
  ``patch`` = the window), a connectivity-state code (the dynamic-FC states of Allen et al. 2014).
  The encoder takes the log-variances of ``width`` learned spatial projections of the window's
  standardised signal (``log v'Cv`` of its correlation ``C``: any number of ROIs, a learned
  vector per ROI); the decoder rebuilds the window's correlation matrix as the correlation of
  a learned vector per ROI modulated by the code. A scan's bag of codes, read linearly, is its
  FC; their order is how the coupling moves. Windows ``stride`` apart give a token each.
  With ``encoder="fc"`` nothing is learned between the window and its code: the code vector is
  the window's correlations themselves (the upper triangle, ``rois * (rois - 1) / 2`` values,
  for the ``rois`` of one atlas), compared by their direction from the mean of the training
  windows (a centred quantizer initialised by k-means on ``16 * num_codes`` windows, then EMA),
  and a code is rebuilt as that mean plus its centroid at a learned length per code: the
  dynamic-FC states of Allen et al. 2014 as a codebook.

Tokens are projected to the code dimension and quantized; the decoder (same transformer)
reconstructs :meth:`FMRITokenizer.target`: the normalised signal of every ROI and patch (and
optionally its amplitude spectrum, NeuroLM), or the window's correlation matrix in the
connectivity layout. Any number of ROIs up to ``max_rois`` and of patches up to ``max_patches``
works with the same weights. :meth:`FMRITokenizer.decode` rebuilds that target from codes alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from annotated_types import Ge, Gt, Lt
from torch import nn

from fmrilm.models.quantizer import QuantizerOutput, VectorQuantizer


FC_INIT_PER_CODE = 16  # the fc encoder's k-means initialisation waits for this many windows per code


@dataclass(frozen=True)
class TokenizerConfig:
    """Sizes of the tokenizer (defaults: a small model that trains on a CPU). A plain dataclass:
    the job spec (``model:`` of a tokenizer spec) validates it, bounds included."""

    layout: Literal["roi", "state", "connectivity"] = "roi"  # a token per ROI and patch / per patch / per window
    encoder: Literal["learned", "fc"] = "learned"  # connectivity layout: a learned encoder, or the window's correlations themselves
    rois: Annotated[int, Ge(0)] = 0  # encoder "fc": the atlas' ROIs (its codebook lives in their pairs' space; 0 = set by the stage)
    patch: Annotated[int, Ge(1)] = 16  # timepoints per patch
    width: Annotated[int, Ge(8)] = 64  # transformer width
    depth: Annotated[int, Ge(1)] = 2  # encoder layers (the decoder has the same)
    heads: Annotated[int, Ge(1)] = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    code_dim: Annotated[int, Ge(2)] = 32
    num_codes: Annotated[int, Ge(2)] = 512
    beta: Annotated[float, Ge(0)] = 1.0  # commitment weight
    ema_decay: Annotated[float, Gt(0), Lt(1)] = 0.99
    dead_threshold: float = 1e-3
    spectrum_weight: Annotated[float, Ge(0)] = 0.0  # weight of the amplitude-spectrum target (NeuroLM); 0 = off
    max_rois: int = 512
    max_patches: int = 64


@dataclass
class TokenizerOutput:
    recon: torch.Tensor  # the target rebuilt: [batch, rois, time], or [batch, rois, rois] (connectivity layout)
    codes: torch.Tensor  # [batch, channels, patches]; channels = rois (roi layout) or 1 (state, connectivity)
    features: torch.Tensor  # [batch, channels * patches, width] encoder features (pre-quantization)
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
        if cfg.encoder == "fc":
            self._init_fc_states(cfg)
            return
        signal = cfg.layout != "connectivity"  # the connectivity layout neither embeds nor rebuilds a patch's waveform
        self.patch_embed = nn.Linear(cfg.patch, cfg.width) if signal else None
        self.roi_embed = nn.Embedding(cfg.max_rois, cfg.width)
        self.time_embed = nn.Embedding(cfg.max_patches, cfg.width)
        self.encoder = _encoder(cfg)
        self.enc_norm = nn.LayerNorm(cfg.width)
        self.to_code = nn.Linear(cfg.width, cfg.code_dim)
        self.quantizer = VectorQuantizer(cfg.num_codes, cfg.code_dim, cfg.beta, cfg.ema_decay, cfg.dead_threshold)
        self.from_code = nn.Linear(cfg.code_dim, cfg.width)
        self.decoder = _encoder(cfg)
        self.dec_norm = nn.LayerNorm(cfg.width)
        self.to_patch = nn.Linear(cfg.width, cfg.patch) if signal else None
        self.to_spectrum = nn.Linear(cfg.width, cfg.patch // 2 + 1) if cfg.spectrum_weight > 0 else None
        nn.init.normal_(self.roi_embed.weight, std=0.02)
        if cfg.layout == "connectivity":
            if cfg.spectrum_weight > 0:
                raise ValueError("the connectivity layout rebuilds correlations, not a signal: set spectrum_weight to 0")
            # log-variances of the spatial projections -> a token, normalised per window first: their profile over the
            # projections is the coupling
            self.variance_embed = nn.Sequential(nn.LayerNorm(cfg.width), nn.Linear(cfg.width, cfg.width))
        if cfg.layout != "roi":  # ROI weights of the set encoder / spatial projections (roi_embed) and of the read-out (roi_out)
            self.roi_out = nn.Embedding(cfg.max_rois, cfg.width)
            self.state_out = nn.Linear(cfg.width, cfg.width)
            nn.init.normal_(self.roi_embed.weight, std=1.0)
            nn.init.normal_(self.roi_out.weight, std=1.0)
        nn.init.normal_(self.time_embed.weight, std=0.02)

    def _init_fc_states(self, cfg: TokenizerConfig) -> None:
        """The ``encoder="fc"`` model: a centred quantizer over the window's correlations and a
        learned log-length per code (its only parameters)."""
        if cfg.layout != "connectivity":
            raise ValueError(f"encoder 'fc' codes a window's correlations: it needs layout 'connectivity', not {cfg.layout!r}")
        if cfg.rois < 2:
            raise ValueError("encoder 'fc' needs the atlas' ROI count (model.rois): its codebook lives in their pairs' space")
        pairs = cfg.rois * (cfg.rois - 1) // 2
        self.quantizer = VectorQuantizer(cfg.num_codes, pairs, cfg.beta, cfg.ema_decay, cfg.dead_threshold,
                                         init_vectors=FC_INIT_PER_CODE * cfg.num_codes, centered=True)
        self.log_length = nn.Parameter(torch.zeros(cfg.num_codes))

    @property
    def fc_states(self) -> bool:
        """Whether codes are the window's correlations themselves (``encoder="fc"``)."""
        return self.cfg.encoder == "fc"

    def _fc_rebuild(self, directions: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Correlation matrices ``[n, rois, rois]`` of code directions ``[n, pairs]`` (centred, unit):
        the centre plus each direction at its code's learned length."""
        q = self.quantizer
        upper = q.center + q.scale * self.log_length[codes].exp()[:, None] * directions
        r = self.cfg.rois
        i, j = torch.triu_indices(r, r, 1, device=upper.device)
        m = torch.eye(r, device=upper.device).repeat(len(upper), 1, 1)
        m[:, i, j] = upper
        m[:, j, i] = upper
        return m

    def channels(self, rois: int) -> int:
        """Code channels per patch for ``rois`` ROIs: ``rois`` (roi layout) or 1 (state, connectivity)."""
        return rois if self.cfg.layout == "roi" else 1

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, rois, time]`` -> ``[batch, rois, patches, patch]``."""
        b, r, t = x.shape
        p = self.cfg.patch
        if t % p:
            raise ValueError(f"window length {t} is not a multiple of the patch length {p}")
        if r > self.cfg.max_rois or t // p > self.cfg.max_patches:
            raise ValueError(f"{r} ROIs x {t // p} patches exceed max_rois={self.cfg.max_rois} / max_patches={self.cfg.max_patches}")
        return x.reshape(b, r, t // p, p)

    def _positions(self, c: int, n: int, device) -> torch.Tensor:
        """Position embedding of ``c`` channels x ``n`` patches, channel-major ``[c * n, width]``
        (a single-channel layout carries no ROI embedding)."""
        times = self.time_embed(torch.arange(n, device=device))[None, :, :]
        if self.cfg.layout != "roi":
            return times.reshape(n, -1)
        rois = self.roi_embed(torch.arange(c, device=device))[:, None, :]
        return (rois + times).reshape(c * n, -1)

    checkpointing = False  # activation checkpointing of every transformer layer while training (set by the training stage)

    def _layers(self, stack: nn.TransformerEncoder, h: torch.Tensor) -> torch.Tensor:
        for layer in stack.layers:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False)
            else:
                h = layer(h)
        return h

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """What the decoder rebuilds of windows ``x [batch, rois, time]``: ``x`` itself, or its
        correlation matrix ``[batch, rois, rois]`` in the connectivity layout."""
        return window_fc(x) if self.cfg.layout == "connectivity" else x

    def target_scale(self, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """What the reconstruction error of ``target`` (:meth:`target`) is divided by in training: 1
        for the normalised signal; in the connectivity layout the variance of the ``valid`` rows'
        off-diagonal correlations (about 0.05 for 30-TR windows), so the commitment and alignment
        weights weigh against the same unit reconstruction loss in every layout (at the raw
        scale the commitment pinned every window to one code)."""
        if self.cfg.layout != "connectivity" or not bool(valid.any()):
            return target.new_ones(())
        off = ~torch.eye(target.shape[-1], dtype=torch.bool, device=target.device)
        return target[valid][:, off].detach().var().clamp_min(1e-4)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features ``[batch, channels * patches, width]`` of windows ``[batch, rois, time]``."""
        patches = self.patchify(x)
        b, r, n, _ = patches.shape
        if self.fc_states:  # the window's correlations themselves, [batch, 1, pairs]
            if n != 1 or r != self.cfg.rois:
                raise ValueError(f"encoder 'fc' codes whole windows of {self.cfg.rois} ROIs ({self.cfg.patch} time points), "
                                 f"not {r} ROIs x {x.shape[-1]} time points")
            i, j = torch.triu_indices(r, r, 1, device=x.device)
            return window_fc(x)[:, i, j][:, None, :]
        if self.cfg.layout == "connectivity":  # log-variances of learned spatial projections: log v'Cv per ROI vector v
            if n != 1:
                raise ValueError(f"the connectivity layout codes a window whole: a window of {x.shape[-1]} time points needs patch "
                                 f"{x.shape[-1]}, not {self.cfg.patch}")
            z = x - x.mean(-1, keepdim=True)
            z = z / z.pow(2).mean(-1, keepdim=True).add(1e-8).sqrt()
            proj = torch.einsum("brt,rw->btw", z, self.roi_embed.weight[:r]) / r**0.5
            tokens = self.variance_embed(torch.log(proj.pow(2).mean(1) + 1e-4))[:, None, :]
        elif self.cfg.layout == "state":  # set encoder: each ROI's patch embedding weighted by its ROI vector, summed / sqrt(rois)
            roi = self.roi_embed(torch.arange(r, device=x.device))[None, :, None, :]
            tokens = (self.patch_embed(patches) * roi).sum(1) / r**0.5
        else:
            tokens = self.patch_embed(patches).reshape(b, r * n, -1)
        tokens = tokens + self._positions(self.channels(r), n, x.device)
        return self.enc_norm(self._layers(self.encoder, tokens))

    def _decode(self, quantized: torch.Tensor, r: int, n: int) -> torch.Tensor:
        """Decoder state of every ROI and patch ``[batch, rois, patches, width]`` from quantized
        vectors ``[batch * channels * patches, code_dim]``."""
        c = self.channels(r)
        h = self.from_code(quantized).reshape(-1, c * n, self.cfg.width) + self._positions(c, n, quantized.device)
        h = self.dec_norm(self._layers(self.decoder, h))
        if self.cfg.layout != "roi":  # read each ROI out of the state with its own weights
            roi = self.roi_out(torch.arange(r, device=h.device))[None, :, None, :]
            return self.state_out(h)[:, None] * roi
        return h.reshape(-1, r, n, self.cfg.width)

    def _rebuild(self, h: torch.Tensor, t: int) -> torch.Tensor:
        """The target from decoder states ``[batch, rois, patches, width]``: the signal
        ``[batch, rois, t]``, or (connectivity) the correlation of the ROIs' vectors ``[batch, rois, rois]``."""
        if self.cfg.layout == "connectivity":
            return window_fc(h[:, :, 0])
        return self.to_patch(h).reshape(h.shape[0], h.shape[1], t)

    def forward(self, x: torch.Tensor) -> TokenizerOutput:
        """Encode, quantize, decode windows ``[batch, rois, time]``."""
        b, r, t = x.shape
        n = t // self.cfg.patch
        feats = self.encode(x)
        with torch.autocast(x.device.type, enabled=False):  # code search and EMA updates in fp32 under any autocast
            quant = self.quantizer(self._code_inputs(feats.float()))
        if self.fc_states:
            recon = self._fc_rebuild(quant.quantized, quant.codes)
            return TokenizerOutput(recon, quant.codes.reshape(b, 1, 1), feats, quant, torch.zeros((), device=x.device))
        h = self._decode(quant.quantized, r, n)
        recon = self._rebuild(h, t)
        spectrum_loss = torch.zeros((), device=x.device)
        if self.to_spectrum is not None:
            target = torch.fft.rfft(self.patchify(x), dim=-1).abs()
            spectrum_loss = F.mse_loss(self.to_spectrum(h), target)
        return TokenizerOutput(recon, quant.codes.reshape(b, self.channels(r), n), feats, quant, spectrum_loss)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, rois: int) -> torch.Tensor:
        """The target rebuilt from code ids ``[batch, channels, patches]`` alone (what the codes
        keep of the input): the signal ``[batch, rois, patches * patch]``, or (connectivity) each
        window's correlation matrix ``[batch, rois, rois]``."""
        b, c, n = codes.shape
        if c != self.channels(rois):
            raise ValueError(f"{c} code channels do not fit {rois} ROIs in the {self.cfg.layout} layout")
        if self.fc_states:
            flat = codes.reshape(-1)
            return self._fc_rebuild(self.quantizer.codebook[flat], flat)
        h = self._decode(self.quantizer.codebook[codes.reshape(-1)], rois, n)
        return self._rebuild(h, n * self.cfg.patch)

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Code ids ``[batch, channels, patches]`` of windows ``[batch, rois, time]`` (no updates)."""
        return self.tokenize_with_features(x)[0]

    @torch.no_grad()
    def tokenize_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Code ids ``[batch, channels, patches]`` and encoder features ``[batch, channels, patches, width]``."""
        b, r, t = x.shape
        c, n = self.channels(r), t // self.cfg.patch
        feats = self.encode(x)
        z = self.quantizer.directions(self._code_inputs(feats))
        return self.quantizer.nearest(z).reshape(b, c, n), feats.reshape(b, c, n, -1)

    def _code_inputs(self, feats: torch.Tensor) -> torch.Tensor:
        """What the quantizer codes, ``[tokens, code_dim]`` (``[tokens, pairs]`` with the fc
        encoder), of encoder features ``[batch, tokens, width]``."""
        return feats.reshape(-1, feats.shape[-1]) if self.fc_states else self.to_code(feats).reshape(-1, self.cfg.code_dim)


def window_fc(x: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each window's ROIs: ``[batch, rois, time]`` -> ``[batch, rois, rois]``
    (a constant ROI correlates with nothing, itself included)."""
    z = x.float() - x.float().mean(-1, keepdim=True)
    z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return z @ z.transpose(1, 2)


def r2_per_roi(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """R^2 of each (window, ROI) along the last axis (time, or a correlation row):
    ``[batch, rois, time]`` x2 -> ``[batch, rois]``."""
    sse = ((x - recon) ** 2).sum(-1)
    sst = ((x - x.mean(-1, keepdim=True)) ** 2).sum(-1)
    return 1 - sse / sst.clamp_min(1e-8)
