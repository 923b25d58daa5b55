"""A scan as an image, the way a vision-language model is shown fMRI (the Yale poster's VLM arm):
a carpet (ROIs x time, each ROI z-scored over time), its connectivity matrix as a heatmap, or
both side by side. Images have one fixed size (the time axis is resampled to the width) and one
colour scale, fitted on training scans only (:func:`fit_scale`), so a test scan's colours say
nothing about the test set."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Literal

import numpy as np

View = Literal["carpet", "fc", "both"]
VIEWS: tuple[str, ...] = ("carpet", "fc", "both")
PERCENTILES = (1.0, 99.0)  # the colour limits: these percentiles of the training scans' values
COLOURMAP = "RdBu_r"  # diverging: negative blue, zero white, positive red


@dataclass(frozen=True)
class ImageScale:
    """Colour limits ``(low, high)`` of the carpet's z-scores and of the FC values."""

    carpet: tuple[float, float]
    fc: tuple[float, float]

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageScale":
        return cls(tuple(d["carpet"]), tuple(d["fc"]))


def zscore_rows(x: np.ndarray) -> np.ndarray:
    """``x [rois, time]`` with each ROI z-scored over time (a flat ROI stays 0)."""
    x = np.asarray(x, np.float64)
    sd = x.std(axis=1, keepdims=True)
    return np.divide(x - x.mean(axis=1, keepdims=True), sd, out=np.zeros_like(x), where=sd > 0)


def connectivity(x: np.ndarray) -> np.ndarray:
    """Pearson FC ``[rois, rois]`` of ``x [rois, time]`` (:func:`fmrilm.features.connectivity.pearson_fc`;
    a flat ROI's row 0), the diagonal set to 0 (it would saturate the scale)."""
    from fmrilm.features.connectivity import pearson_fc

    fc = np.nan_to_num(pearson_fc(zscore_rows(x)))
    np.fill_diagonal(fc, 0.0)
    return fc


def fit_scale(series: Iterable[np.ndarray]) -> ImageScale:
    """The colour limits from training scans ``[rois, time]`` each: percentiles of their
    z-scored values and of their off-diagonal FC values."""
    z, fc = [], []
    for x in series:
        z.append(zscore_rows(x).ravel())
        m = connectivity(x)
        fc.append(m[np.triu_indices_from(m, 1)])
    if not z:
        raise ValueError("fit_scale needs at least one training scan")
    lo, hi = PERCENTILES
    zs, fcs = np.concatenate(z), np.concatenate(fc)
    return ImageScale((float(np.percentile(zs, lo)), float(np.percentile(zs, hi))),
                      (float(np.percentile(fcs, lo)), float(np.percentile(fcs, hi))))


def colour(values: np.ndarray, limits: tuple[float, float]) -> np.ndarray:
    """``values [h, w]`` clipped to ``limits`` and coloured: ``uint8 [h, w, 3]``."""
    from matplotlib import colormaps

    lo, hi = limits
    t = np.clip((values - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    return (colormaps[COLOURMAP](t)[..., :3] * 255).round().astype(np.uint8)


def resized(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """``rgb [h, w, 3]`` resampled to ``[height, width, 3]`` (bilinear)."""
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))


def carpet(x: np.ndarray, scale: ImageScale, size: int) -> np.ndarray:
    """The carpet of ``x [rois, time]``: ``uint8 [size, size, 3]``, ROIs down, time across."""
    return resized(colour(zscore_rows(x), scale.carpet), size, size)


def fc_heatmap(x: np.ndarray, scale: ImageScale, size: int) -> np.ndarray:
    """The FC matrix of ``x [rois, time]`` as a heatmap: ``uint8 [size, size, 3]``."""
    return resized(colour(connectivity(x), scale.fc), size, size)


def render(x: np.ndarray, view: View, scale: ImageScale, size: int):
    """The image of one scan ``x [rois, time]`` (a PIL RGB image): ``size x size`` for one view,
    ``size x 2*size`` (carpet left, FC right) for ``both``."""
    from PIL import Image

    if view not in VIEWS:
        raise ValueError(f"unknown image view {view!r}; use one of {list(VIEWS)}")
    parts = {"carpet": [carpet], "fc": [fc_heatmap], "both": [carpet, fc_heatmap]}[view]
    return Image.fromarray(np.concatenate([p(x, scale, size) for p in parts], axis=1))
