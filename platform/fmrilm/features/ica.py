"""Group spatial ICA with dual regression, and spectral descriptors (fALFF, band ratios).

Spatial ICA in ROI space: the training scans' robust-scaled series are concatenated in time
(``[rois, time_total]``) and decomposed with FastICA into maps over ROIs that are independent
across ROIs. Dual regression, stage 1, gives each scan's component time courses by regressing the
group maps onto its ``[rois, time]`` series.
"""

from __future__ import annotations

import numpy as np

LOW_BAND = (0.01, 0.08)  # the classic resting-state band (Hz)


def group_ica(series: list[np.ndarray], n_components: int, seed: int = 0) -> np.ndarray:
    """Spatial maps ``[rois, n_components]`` from training series (each ``[rois, time]``).

    Maps are unit-norm with their largest-magnitude ROI positive.
    """
    from sklearn.decomposition import FastICA

    x = np.concatenate([s - s.mean(axis=1, keepdims=True) for s in series], axis=1)  # [rois, T]
    n_components = min(n_components, x.shape[0] - 1, x.shape[1])
    ica = FastICA(n_components=n_components, random_state=seed, whiten="unit-variance", max_iter=1000, tol=1e-3)
    maps = ica.fit_transform(x)  # samples = ROIs -> sources independent across ROIs
    maps /= np.linalg.norm(maps, axis=0, keepdims=True)
    signs = np.sign(maps[np.abs(maps).argmax(axis=0), np.arange(maps.shape[1])])
    return maps * signs


def dual_regression(ts: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Stage 1 of dual regression: component time courses ``[components, time]`` of one scan
    ``[rois, time]`` given group maps ``[rois, components]``."""
    centred = ts - ts.mean(axis=1, keepdims=True)
    return np.linalg.lstsq(maps, centred, rcond=None)[0]


def dominant_network(maps: np.ndarray, networks: list[str]) -> list[str]:
    """The network with the largest mean |weight| in each component map."""
    names = list(dict.fromkeys(networks))
    nets = np.asarray(networks)
    return [names[int(np.argmax([np.abs(maps[nets == n, c]).mean() for n in names]))] for c in range(maps.shape[1])]


def amplitude_spectrum(ts: np.ndarray, tr: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided amplitude spectrum of detrended series: ``[..., time]`` -> (freqs, ``[..., freqs]``)."""
    from scipy.signal import detrend

    x = detrend(np.asarray(ts, dtype=np.float64), axis=-1)
    return np.fft.rfftfreq(x.shape[-1], d=tr), np.abs(np.fft.rfft(x, axis=-1))


def falff(ts: np.ndarray, tr: float, band: tuple[float, float] = LOW_BAND) -> np.ndarray:
    """Fractional ALFF per row: amplitude in ``band`` over amplitude at all non-zero frequencies."""
    freqs, amp = amplitude_spectrum(ts, tr)
    inband = (freqs >= band[0]) & (freqs <= band[1])
    total = amp[..., freqs > 0].sum(axis=-1)
    return amp[..., inband].sum(axis=-1) / np.where(total > 0, total, np.nan)


def band_ratio(ts: np.ndarray, tr: float, band: tuple[float, float] = LOW_BAND) -> np.ndarray:
    """Low/high frequency power ratio per row: power in ``band`` over power above it (to Nyquist)."""
    freqs, amp = amplitude_spectrum(ts, tr)
    low = (amp[..., (freqs >= band[0]) & (freqs <= band[1])] ** 2).sum(axis=-1)
    high = (amp[..., freqs > band[1]] ** 2).sum(axis=-1)
    return low / np.where(high > 0, high, np.nan)


def variability(ts: np.ndarray) -> np.ndarray:
    """Temporal variability per row: RMS of successive differences over the standard deviation."""
    sd = ts.std(axis=-1)
    return np.sqrt(np.mean(np.diff(ts, axis=-1) ** 2, axis=-1)) / np.where(sd > 0, sd, np.nan)
