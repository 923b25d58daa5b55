"""The classical readers as baselines, and the best of them per task.

Every reader of :mod:`fmrilm.features.dynamics` (FC, pre-whitened FC by network and by ROI, ROI timescale, lagged-FC
asymmetry, windowed-FC spread, amplitude moments, all combined) gives each scan one vector; a
linear model (logistic or ridge, penalty by inner CV) is fitted on the training scans' vectors and
predicts the test scans (:func:`fit_readers`). Method names are ``<reader>_linear`` on the time
points the LM's prompt shows and ``<reader>_linear_whole_scan`` on the whole scan.

``best_classical`` is the reader whose inner cross-validation score on the training scans is the
highest (neg. log-loss for classification, neg. MSE for regression; the same folds for every
reader): chosen without looking at a test scan, so the headline comparison cannot flatter a
baseline either way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from fmrilm.eval import baselines
from fmrilm.features import dynamics

log = logging.getLogger("fmrilm.eval")
READERS = tuple(r for r in dynamics.READERS if r != "fc")  # FC + linear is fc_linear, computed with the other baselines
BEST = "best_classical"


def reader_vectors(series: dict[str, np.ndarray], networks: dict[str, Sequence[str] | None]) -> dict[str, dict[str, np.ndarray]]:
    """``reader -> scan_id -> vector`` for every reader but FC; ``series`` maps scan_id to its
    ``[rois, time]`` series, ``networks`` scan_id to its ROIs' networks (None: ROI level). A reader
    whose vectors differ in length across the scans (mixed atlases), or that applies to some scans
    only (``prewhitened_fc_roi`` needs networks), is left out with a warning; one that applies to
    none is left out silently."""
    every = {s: dynamics.read_all(x, networks.get(s)) for s, x in series.items()}
    out: dict[str, dict[str, np.ndarray]] = {}
    for reader in READERS:
        vecs = {s: v[reader] for s, v in every.items() if reader in v}
        if not vecs:
            continue
        if len(vecs) < len(every) or len({v.shape for v in vecs.values()}) > 1:
            log.warning("%s baseline skipped: the scans have different ROI counts or networks", reader)
            continue
        out[reader] = vecs
    return out


def fit_readers(vectors: dict[str, dict[str, np.ndarray]], train_ids: list[str], y_train: np.ndarray, test_ids: list[str],
                classes: list[str], regression: bool, seed: int = 0, suffix: str = "") -> dict[str, dict]:
    """``<reader>_linear<suffix> -> {"pred", "scores" (classification), "cv_score"}`` for every
    reader of ``vectors`` (see :func:`reader_vectors`)."""
    out = {}
    for reader, vecs in vectors.items():
        x_tr = np.stack([vecs[s] for s in train_ids])
        x_te = np.stack([vecs[s] for s in test_ids])
        if regression:
            out[f"{reader}_linear{suffix}"] = baselines.fit_regressor(x_tr, np.asarray(y_train, float), x_te)
        elif len(set(y_train)) >= 2:
            out[f"{reader}_linear{suffix}"] = baselines.fit_classifier(x_tr, y_train, x_te, classes, seed)
    return out


def best_of(outs: dict[str, dict]) -> tuple[str, dict] | None:
    """The method with the highest training-CV score among ``outs`` (methods without one are not
    candidates); None when no method has a score."""
    scored = [(m, o) for m, o in outs.items() if o.get("cv_score") is not None and np.isfinite(o["cv_score"])]
    return max(scored, key=lambda item: item[1]["cv_score"]) if scored else None
