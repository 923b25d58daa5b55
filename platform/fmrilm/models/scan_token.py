"""The scan-level token: one vector per scan from the tokenizer encoder's features.

The planted and the real between-subject differences of resting-state fMRI live mostly in how
regions covary over time (connectivity). Per-token codes keep little of it, and a prompt holds
only a fixed budget of time steps, so the LM also gets one summary of the *whole* scan computed
from the tokenizer's own outputs: the encoder features' connectivity, i.e. for every encoder
dimension the correlation across time steps between every pair of ROIs, averaged over the
dimensions. Its upper triangle is the scan vector; the LM stage standardises it with the
training scans' mean and spread and projects it into the embedding space at one token per block
(:class:`fmrilm.models.fmri_lm.FMRIInputLM`): the block's closing token, or in an instruction
the token that predicts the answer about the scan (:func:`fmrilm.data.instructions.encode`).
"""

from __future__ import annotations

import numpy as np


def feature_connectivity(feats: np.ndarray) -> np.ndarray:
    """``feats [rois, steps, width]`` (encoder features of consecutive time steps) -> ``[rois, rois]``:
    per width dimension the Pearson correlation over steps between ROIs, averaged over dimensions.
    A dimension constant over time in an ROI contributes 0 for it. Needs at least 2 steps."""
    feats = np.asarray(feats, np.float64)
    rois, steps, width = feats.shape
    if steps < 2:
        raise ValueError(f"a scan vector needs at least 2 time steps of encoder features, got {steps}")
    centred = feats - feats.mean(1, keepdims=True)
    spread = centred.std(1, keepdims=True)
    z = np.divide(centred, spread, out=np.zeros_like(centred), where=spread > 1e-8)
    return np.einsum("rsw,qsw->rq", z, z) / (steps * width)


def scan_vector(feats: np.ndarray) -> np.ndarray:
    """The scan vector of ``feats [rois, steps, width]``: the upper triangle (above the diagonal)
    of :func:`feature_connectivity`, ``[rois * (rois - 1) / 2]`` float32."""
    conn = feature_connectivity(feats)
    return conn[np.triu_indices(len(conn), 1)].astype(np.float32)


def scan_dim(rois: int) -> int:
    """Length of the scan vector of ``rois`` ROIs."""
    return rois * (rois - 1) // 2


def standardiser(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std)`` over ``vectors [scans, dim]`` (training scans), std floored so constant
    entries stay finite; applied as ``(v - mean) / std``."""
    vectors = np.asarray(vectors, np.float64)
    if len(vectors) == 0:
        raise ValueError("standardising scan vectors needs at least one training scan")
    return vectors.mean(0).astype(np.float32), np.maximum(vectors.std(0), 1e-3).astype(np.float32)


def scan_vectors(feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``scan_id -> scan vector`` (:func:`fmrilm.models.scan_token.scan_vector`) of every scan's
    whole-scan encoder features ``[rois, steps, width]``."""
    return {sid: scan_vector(f) for sid, f in feats.items()}
