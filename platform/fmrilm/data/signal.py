"""Signal helpers on ROI series ``[rois, time]``: per-ROI robust scaling, resampling to another
TR, and cutting into windows. Pure numpy/scipy; the Ray Data pipeline
(:mod:`fmrilm.data.pipeline`), features, baselines and benchmarks all use these."""

from __future__ import annotations

from fractions import Fraction

import numpy as np


def robust_scale(ts: np.ndarray) -> np.ndarray:
    """Per-ROI robust scaling over time: ``(x - median) / IQR``; ``[rois, time]`` -> same.

    An ROI with zero IQR is only centred (divided by 1), never divided by zero.
    """
    ts = np.asarray(ts, dtype=np.float64)
    med = np.median(ts, axis=-1, keepdims=True)
    q75, q25 = np.percentile(ts, [75, 25], axis=-1, keepdims=True)
    iqr = q75 - q25
    iqr = np.where(iqr > 0, iqr, 1.0)
    return ((ts - med) / iqr).astype(np.float32)


def resample(ts: np.ndarray, tr: float, target_tr: float) -> np.ndarray:
    """Resample ``[rois, time]`` from ``tr`` to ``target_tr`` seconds (polyphase, anti-aliased)."""
    if abs(tr - target_tr) < 1e-6:
        return ts
    from scipy.signal import resample_poly

    ratio = Fraction(tr / target_tr).limit_denominator(100)
    return resample_poly(ts, ratio.numerator, ratio.denominator, axis=-1).astype(np.float32)


def resampled_length(n_timepoints: int, tr: float, target_tr: float | None) -> int:
    """Length of a series of ``n_timepoints`` after :func:`resample`."""
    if target_tr is None or abs(tr - target_tr) < 1e-6:
        return int(n_timepoints)
    ratio = Fraction(tr / target_tr).limit_denominator(100)
    return int(-(-n_timepoints * ratio.numerator // ratio.denominator))


def n_windows(n_timepoints: int, window: int, stride: int) -> int:
    """How many windows :func:`windows` cuts from a series of ``n_timepoints``."""
    return 0 if n_timepoints < window else 1 + (n_timepoints - window) // stride


def windows(ts: np.ndarray, window: int, stride: int) -> np.ndarray:
    """Cut ``[rois, time]`` into ``[n_windows, rois, window]`` with the given stride."""
    n = n_windows(ts.shape[-1], window, stride)
    if n == 0:
        return np.zeros((0, ts.shape[0], window), dtype=ts.dtype)
    starts = np.arange(n) * stride
    return np.stack([ts[:, s : s + window] for s in starts])
