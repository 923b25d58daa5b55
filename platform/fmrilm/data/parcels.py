"""Coarser atlases from finer ones: the series of a union of parcels is the volume-weighted mean of
its parcels' series (exact when each parcel's series is the mean over its voxels)."""

from __future__ import annotations

import numpy as np


def merge_parcels(series: np.ndarray, groups: list[list[int]], weights: list[float] | None = None) -> np.ndarray:
    """Merge parcels of ``series`` ``[rois, time]`` into ``[len(groups), time]``: row ``g`` is the
    mean of rows ``groups[g]`` weighted by ``weights`` (voxel counts per fine parcel; equal if None)."""
    series = np.asarray(series, dtype=np.float64)
    w = np.ones(series.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (series.shape[0],) or (w <= 0).any():
        raise ValueError(f"weights: expected {series.shape[0]} positive values, got shape {w.shape}")
    out = np.empty((len(groups), series.shape[1]))
    for g, members in enumerate(groups):
        idx = np.asarray(members, dtype=int)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= series.shape[0]:
            raise ValueError(f"group {g}: member indices {members} outside 0..{series.shape[0] - 1}")
        out[g] = w[idx] @ series[idx] / w[idx].sum()
    return out


def group_labels(labels: list[str], key) -> tuple[list[str], list[list[int]]]:
    """Group fine parcel ``labels`` by ``key(label) -> coarse label`` (first-seen order); returns
    (coarse labels, member indices of each)."""
    names: list[str] = []
    members: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        name = key(label)
        if name not in members:
            names.append(name)
            members[name] = []
        members[name].append(i)
    return names, [members[n] for n in names]
