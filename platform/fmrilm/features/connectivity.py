"""Functional connectivity: full and partial correlation, and network-level summaries."""

from __future__ import annotations

import numpy as np


def pearson_fc(ts: np.ndarray) -> np.ndarray:
    """Pearson correlation between ROIs: ``[rois, time]`` -> ``[rois, rois]`` (nilearn's
    ``ConnectivityMeasure(kind="correlation")`` with the empirical covariance)."""
    from nilearn.connectome import ConnectivityMeasure
    from sklearn.covariance import EmpiricalCovariance

    fc = ConnectivityMeasure(kind="correlation", cov_estimator=EmpiricalCovariance(), standardize=False)
    return fc.fit_transform([np.asarray(ts, dtype=np.float64).T])[0]


def partial_fc(ts: np.ndarray) -> np.ndarray:
    """Partial correlation with Ledoit-Wolf shrinkage: ``[rois, time]`` -> ``[rois, rois]``."""
    from nilearn.connectome import ConnectivityMeasure
    from sklearn.covariance import LedoitWolf

    fc = ConnectivityMeasure(kind="partial correlation", cov_estimator=LedoitWolf(store_precision=False), standardize=False)
    return fc.fit_transform([np.asarray(ts, dtype=np.float64).T])[0]


def network_means(fc: np.ndarray, networks: list[str]) -> tuple[list[str], np.ndarray]:
    """Mean connectivity within (off-diagonal ROI pairs) and between networks.

    Takes ``fc [rois, rois]`` and the network of each ROI; returns ``(names, [nets, nets])``
    with names in first-appearance order. A single-ROI network has NaN within-connectivity.
    """
    names = list(dict.fromkeys(networks))
    idx = [np.flatnonzero(np.asarray(networks) == n) for n in names]
    out = np.full((len(names), len(names)), np.nan)
    for a, ia in enumerate(idx):
        for b, ib in enumerate(idx):
            block = fc[np.ix_(ia, ib)]
            if a == b:
                mask = ~np.eye(len(ia), dtype=bool)
                out[a, b] = block[mask].mean() if mask.any() else np.nan
            else:
                out[a, b] = block.mean()
    return names, out


def extreme_pairs(values: dict[str, float], k: int = 1) -> tuple[list[str], list[str]]:
    """The ``k`` largest and ``k`` smallest entries of a name -> value map (NaNs ignored)."""
    items = sorted(((v, n) for n, v in values.items() if np.isfinite(v)))
    return [n for _, n in items[::-1][:k]], [n for _, n in items[:k]]


def stitch(windows: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """The series that windows of one scan cover: ``[(start, [rois, window]), ...]`` (any order,
    overlapping or not) -> ``[rois, time]`` with each covered time point once, in time order (a
    time point two windows share is taken from the earlier one)."""
    if not windows:
        raise ValueError("stitching needs at least one window")
    parts, end = [], None
    for start, w in sorted(windows, key=lambda item: item[0]):
        begin = 0 if end is None else max(0, end - start)
        if begin < w.shape[1]:
            parts.append(w[:, begin:])
            end = start + w.shape[1]
    return np.concatenate(parts, axis=1)


def signal_fc(ts: np.ndarray) -> np.ndarray:
    """Pearson FC of ``ts [rois, time]`` in numpy, ``[rois, rois]``; a constant ROI correlates
    with nothing (a zero row)."""
    ts = np.asarray(ts, np.float64)
    ts = ts - ts.mean(1, keepdims=True)
    norm = np.linalg.norm(ts, axis=1, keepdims=True)
    z = np.divide(ts, norm, out=np.zeros_like(ts), where=norm > 1e-12)
    return z @ z.T


def fc_agreement(fc_a: np.ndarray, fc_b: np.ndarray) -> float:
    """Pearson r between the upper triangles (no diagonal) of two ``[rois, rois]`` FC matrices
    (0 when either is flat)."""
    iu = np.triu_indices(fc_a.shape[0], 1)
    a, b = np.asarray(fc_a, np.float64)[iu], np.asarray(fc_b, np.float64)[iu]
    if a.std() < 1e-12 or b.std() < 1e-12:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def fc_preservation(inputs: np.ndarray, decoded: np.ndarray) -> float:
    """:func:`fc_agreement` of the FC of ``inputs`` and of ``decoded`` (``[rois, time]`` each, the
    same shape): 1 when the decoded signal keeps every region pair's coupling in proportion."""
    return fc_agreement(signal_fc(inputs), signal_fc(decoded))
