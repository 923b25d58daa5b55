"""Classical readers of an ROI series: the feature vectors that the strongest simple baselines fit
a linear model on (pure numpy).

Each reader maps a series ``[rois, time]`` (robust-scaled inside) and, where the atlas or the
generator names them, the network of each ROI to one feature vector of fixed length per atlas:

* ``fc``: upper-triangle Pearson FC (today's FC + linear);
* ``prewhitened_fc``: Pearson FC of each ROI's AR(1) residual ``x_t - phi_i x_{t-1}`` (``phi_i``
  the ROI's lag-1 autocorrelation, estimated from the scan): the correlation of the innovations,
  free of the autocorrelation that inflates the variance of FC estimates; pooled into
  network-pair means when networks are given;
* ``prewhitened_fc_roi``: the same at ROI level (upper triangle), only where networks are given
  (without them ``prewhitened_fc`` is already at ROI level);
* ``timescale``: per ROI the autocorrelation at lags 1-3 and the spectral slope (log power
  against log frequency of the periodogram);
* ``lagged_fc``: the asymmetry ``C_ij(l) - C_ji(l)`` of the lagged cross-correlation at lags
  1-3, network-pair means when networks are given (who leads whom);
* ``windowed_fc``: the standard deviation over sliding windows of each (network-pair) FC, and its
  mean over pairs (how much coupling wanders: state switching);
* ``amplitude``: per-ROI skewness and excess kurtosis and the global signal's (bursts);
* ``combined``: every reader above, concatenated.

Readers fit nothing: a linear model with a cross-validated penalty is fitted on their vectors by
:mod:`fmrilm.eval.baselines`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

LAGS = (1, 2, 3)
READERS = ("fc", "prewhitened_fc", "prewhitened_fc_roi", "timescale", "lagged_fc", "windowed_fc", "amplitude", "combined")


def _standardise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.mean(1, keepdims=True)
    sd = x.std(1, keepdims=True)
    return np.divide(x, sd, out=np.zeros_like(x), where=sd > 1e-12)


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Correlation of every row of ``a [n, t]`` with every row of ``b [m, t]``: ``[n, m]``."""
    return _standardise(a) @ _standardise(b).T / a.shape[1]


def _upper(m: np.ndarray) -> np.ndarray:
    iu = np.triu_indices(m.shape[0], 1)
    return m[iu]


def _groups(networks: Sequence[str] | None, n_rois: int) -> list[np.ndarray] | None:
    if networks is None:
        return None
    if len(networks) != n_rois:
        raise ValueError(f"{len(networks)} network labels for {n_rois} ROIs")
    names = list(dict.fromkeys(networks))
    return [np.flatnonzero(np.asarray(networks) == n) for n in names]


def _pool(m: np.ndarray, groups: list[np.ndarray], symmetric: bool = True) -> np.ndarray:
    """Network-pair means of a ROI x ROI matrix (within-network blocks without the diagonal):
    the upper triangle with the diagonal when ``symmetric``, every ordered pair otherwise."""
    k = len(groups)
    out = np.zeros((k, k))
    for a, ia in enumerate(groups):
        for b, ib in enumerate(groups):
            block = m[np.ix_(ia, ib)]
            if a == b:
                off = ~np.eye(len(ia), dtype=bool)
                out[a, b] = block[off].mean() if off.any() else 0.0
            else:
                out[a, b] = block.mean()
    return out[np.triu_indices(k)] if symmetric else out[~np.eye(k, dtype=bool)]


def ar1_coefficients(x: np.ndarray) -> np.ndarray:
    """Lag-1 autocorrelation of each ROI of ``[rois, time]``: ``[rois]``, clipped to (-0.99, 0.99)."""
    z = _standardise(x)
    return np.clip((z[:, 1:] * z[:, :-1]).sum(1) / z.shape[1], -0.99, 0.99)


def prewhiten(x: np.ndarray) -> np.ndarray:
    """AR(1) residuals ``x_t - phi_i x_{t-1}`` of each ROI: ``[rois, time]`` -> ``[rois, time - 1]``."""
    z = _standardise(x)
    phi = ar1_coefficients(z)[:, None]
    return z[:, 1:] - phi * z[:, :-1]


def fc(x: np.ndarray, networks: Sequence[str] | None = None) -> np.ndarray:
    """Upper-triangle Pearson FC: ``[rois * (rois - 1) / 2]``."""
    return _upper(_corr(x, x))


def prewhitened_fc(x: np.ndarray, networks: Sequence[str] | None = None) -> np.ndarray:
    """FC of the AR(1) residuals; network-pair means (within included) when ``networks`` is given."""
    p = prewhiten(x)
    m, groups = _corr(p, p), _groups(networks, x.shape[0])
    return _upper(m) if groups is None else _pool(m, groups)


def prewhitened_fc_roi(x: np.ndarray, networks: Sequence[str] | None = None) -> np.ndarray:
    """FC of the AR(1) residuals at ROI level, whatever ``networks``: ``[rois * (rois - 1) / 2]``."""
    return prewhitened_fc(x, None)


def readers_for(networks: Sequence[str] | None) -> tuple[str, ...]:
    """The readers that apply to a scan: every one of :data:`READERS`, less ``prewhitened_fc_roi``
    where no networks are given (``prewhitened_fc`` is then the same vector)."""
    return READERS if networks is not None else tuple(r for r in READERS if r != "prewhitened_fc_roi")


def timescale(x: np.ndarray, networks: Sequence[str] | None = None) -> np.ndarray:
    """Per ROI: autocorrelation at lags 1-3 and the periodogram's log-log slope: ``[rois * 4]``."""
    z = _standardise(x)
    t = z.shape[1]
    acf = [(z[:, lag:] * z[:, :-lag]).sum(1) / t for lag in LAGS]
    power = np.abs(np.fft.rfft(z, axis=1)[:, 1:]) ** 2
    freq = np.log(np.arange(1, power.shape[1] + 1))
    logp = np.log(power + 1e-12)
    fx = freq - freq.mean()
    slope = (logp - logp.mean(1, keepdims=True)) @ fx / (fx @ fx)
    return np.concatenate([*acf, slope])


def lagged_fc(x: np.ndarray, networks: Sequence[str] | None = None) -> np.ndarray:
    """Asymmetry of the lagged cross-correlation ``C_ij(l) - C_ji(l)`` (``C_ij(l)`` = corr of
    ROI i at t with ROI j at t + l) at lags 1-3: upper triangles, or network-pair means (every
    ordered pair) with ``networks``."""
    groups = _groups(networks, x.shape[0])
    parts = []
    for lag in LAGS:
        c = _corr(x[:, :-lag], x[:, lag:])
        asym = c - c.T
        parts.append(_upper(asym) if groups is None else _pool(asym, groups, symmetric=False))
    return np.concatenate(parts)


def windowed_fc(x: np.ndarray, networks: Sequence[str] | None = None, window: int = 20, step: int = 5) -> np.ndarray:
    """Spread over sliding windows (``window`` time points, every ``step``) of the FC: per edge
    (network pair with ``networks``) its standard deviation over windows, then the mean spread:
    ``[pairs + 1]``."""
    from fmrilm.data.signal import windows

    groups = _groups(networks, x.shape[0])
    mats = []
    for w in windows(x, min(window, x.shape[1]), step):
        m = _corr(w, w)
        mats.append(_upper(m) if groups is None else _pool(m, groups))
    spread = np.std(np.stack(mats), axis=0)
    return np.concatenate([spread, [spread.mean()]])


def amplitude(x: np.ndarray, networks: Sequence[str] | None = None) -> np.ndarray:
    """Per-ROI skewness and excess kurtosis of the standardised series, then the global (mean)
    signal's: ``[rois * 2 + 2]``."""
    z = _standardise(x)
    g = _standardise(z.mean(0, keepdims=True))
    rows = np.concatenate([z, g])
    return np.concatenate([(rows**3).mean(1), (rows**4).mean(1) - 3.0])


def combined(x: np.ndarray, networks: Sequence[str] | None = None) -> np.ndarray:
    """Every other reader that applies (:func:`readers_for`), concatenated."""
    return np.concatenate([READER_FUNCTIONS[name](x, networks) for name in readers_for(networks) if name != "combined"])


READER_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "fc": fc, "prewhitened_fc": prewhitened_fc, "prewhitened_fc_roi": prewhitened_fc_roi, "timescale": timescale, "lagged_fc": lagged_fc,
    "windowed_fc": windowed_fc, "amplitude": amplitude, "combined": combined,
}


def read(name: str, x: np.ndarray, networks: Sequence[str] | None = None) -> np.ndarray:
    """Reader ``name`` (one of :data:`READERS`) of a raw or scaled series ``[rois, time]``
    (robust-scaled first, as every stage does)."""
    from fmrilm.data.signal import robust_scale

    if name not in READER_FUNCTIONS:
        raise ValueError(f"unknown reader {name!r}: one of {', '.join(READERS)}")
    return READER_FUNCTIONS[name](robust_scale(np.asarray(x, np.float64)), networks)


def read_all(x: np.ndarray, networks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Every reader that applies (:func:`readers_for`) of one series ``[rois, time]``, robust-scaled
    once; ``combined`` is the concatenation of the others (equal to :func:`combined`, without
    computing them twice)."""
    from fmrilm.data.signal import robust_scale

    z = robust_scale(np.asarray(x, np.float64))
    out = {name: READER_FUNCTIONS[name](z, networks) for name in readers_for(networks) if name != "combined"}
    return out | {"combined": np.concatenate(list(out.values()))}
