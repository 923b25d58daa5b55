"""Metrics with bootstrap confidence intervals (pure numpy/scikit-learn).

Classification: accuracy, balanced accuracy, one-vs-rest macro AUC (from per-class scores).
Regression: MAE and Pearson r. ``bootstrap`` resamples test scans with replacement; for
classification it resamples within each true class (``strata``), so every resample holds every
class in its original count: a resample of one class, where a constant predictor scores a
balanced accuracy of 1.0, cannot happen. :func:`failures` names what makes a result meaningless
(a constant prediction, answers that never parse).
"""

from __future__ import annotations

import numpy as np


def classification(y_true, y_pred, scores: np.ndarray | None = None, classes: list | None = None) -> dict[str, float]:
    """``accuracy``, ``balanced_accuracy`` and (with ``scores [n, classes]``) ``auc`` (binary: of
    the second class; more: one-vs-rest macro). ``classes`` orders the score columns."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    out = {"accuracy": float(accuracy_score(y_true, y_pred)), "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred))}
    if scores is not None and classes is not None and len(set(y_true)) > 1:
        present = [c for c in classes if c in set(y_true)]
        if len(classes) == 2:
            out["auc"] = float(roc_auc_score(y_true == classes[1], scores[:, 1] - scores[:, 0]))
        elif len(present) == len(classes):
            order = np.argsort(classes)  # scikit-learn wants the labels sorted
            p = _softmax(scores)[:, order]
            out["auc"] = float(roc_auc_score(y_true, p, multi_class="ovr", labels=[classes[i] for i in order]))
    return out


def regression(y_true, y_pred) -> dict[str, float]:
    """``mae``, ``pearson_r`` (NaN when either side is constant) and ``spread``: the predictions'
    standard deviation over the true values' (1: as wide as the truth; near 0: one answer for
    everyone, the Yale poster's "narrow output distribution"; NaN for constant true values)."""
    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    r = float(np.corrcoef(y_true, y_pred)[0, 1]) if y_true.std() > 0 and y_pred.std() > 0 else float("nan")
    spread = float(y_pred.std() / y_true.std()) if y_true.std() > 0 else float("nan")
    return {"mae": float(np.abs(y_true - y_pred).mean()), "pearson_r": r, "spread": spread}


def bootstrap(metric, arrays: list[np.ndarray], n: int = 1000, seed: int = 0, level: float = 0.95,
              strata: np.ndarray | None = None) -> dict[str, tuple[float, float]]:
    """Percentile confidence intervals of every key of ``metric(*arrays)`` over ``n`` resamples
    of the rows (within each value of ``strata`` when given: pass the true classes); keys
    undefined in a resample (e.g. Pearson r of a constant) skip it."""
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(a) for a in arrays]
    m = len(arrays[0])
    groups = [np.flatnonzero(np.asarray(strata) == v) for v in np.unique(strata)] if strata is not None else [np.arange(m)]
    draws: dict[str, list[float]] = {}
    for _ in range(n):
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        try:
            values = metric(*(a[idx] for a in arrays))
        except ValueError:
            continue
        for k, v in values.items():
            if np.isfinite(v):
                draws.setdefault(k, []).append(v)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {k: (float(np.percentile(v, lo)), float(np.percentile(v, hi))) for k, v in draws.items() if len(v) >= n // 2}


def failures(y_pred, parse_rate: float | None = None, n_classes: int | None = None, y_true=None) -> list[str]:
    """Why a set of predictions says nothing, as report flags: ``constant prediction`` (one
    value for every scan of a test set with more than one true class, or one number for every
    age; with ``y_true`` for numbers, also a spread under 1 % of the truth's) and ``no answer
    parsed`` (a generated answer that never parsed as a number, so every prediction is the
    fallback)."""
    flags = []
    values = np.asarray(y_pred)
    constant = len(values) > 1 and len(np.unique(values.astype(str))) == 1 and (n_classes is None or n_classes > 1)
    if not constant and y_true is not None and n_classes is None and len(values) > 1:
        truth = np.asarray(y_true, float)
        constant = float(np.std(values.astype(float))) < 0.01 * float(np.std(truth)) if np.std(truth) > 0 else False
    if constant:
        flags.append("constant prediction")
    if parse_rate is not None and parse_rate == 0:
        flags.append("no answer parsed")
    return flags


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def paired_gap(metric, y_true, pred_a, pred_b, n: int = 2000, seed: int = 0, level: float = 0.95,
               strata: np.ndarray | None = None) -> dict:
    """The gap ``metric(y_true, pred_a) - metric(y_true, pred_b)`` of two predictors on the same
    test scans, with a paired bootstrap CI: each resample draws scans (within each value of
    ``strata`` when given: pass the true classes) and scores both predictors on the same draw.
    Returns ``{"gap", "ci": (lo, hi), "n"}``; resamples where the metric is undefined are skipped."""
    rng = np.random.default_rng(seed)
    y, a, b = np.asarray(y_true), np.asarray(pred_a), np.asarray(pred_b)
    groups = [np.flatnonzero(np.asarray(strata) == v) for v in np.unique(strata)] if strata is not None else [np.arange(len(y))]
    draws = []
    for _ in range(n):
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        try:
            d = float(metric(y[idx], a[idx])) - float(metric(y[idx], b[idx]))
        except ValueError:
            continue
        if np.isfinite(d):
            draws.append(d)
    lo, hi = (np.percentile(draws, [(1 - level) / 2 * 100, (1 + level) / 2 * 100]) if draws else (np.nan, np.nan))
    return {"gap": float(metric(y, a)) - float(metric(y, b)), "ci": (float(lo), float(hi)), "n": int(len(y))}


def mcnemar(y_true, pred_a, pred_b) -> float:
    """Exact two-sided McNemar p of two classifiers on the same scans: a binomial test on the scans
    exactly one of them gets right (1.0 when there are none)."""
    from scipy.stats import binomtest

    y = np.asarray(y_true).astype(str)
    right_a, right_b = np.asarray(pred_a).astype(str) == y, np.asarray(pred_b).astype(str) == y
    only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    return 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def within(gap: dict, margin: float, higher_is_better: bool = True) -> bool:
    """Whether a model is within ``margin`` of a baseline, decided on the CI of
    ``gap = model - baseline`` from :func:`paired_gap`: the CI's worse end is no more than
    ``margin`` behind (lower end >= -margin for scores, upper end <= margin for errors)."""
    lo, hi = gap["ci"]
    return bool(lo >= -margin) if higher_is_better else bool(hi <= margin)


def balanced_accuracy(y_true, y_pred) -> float:
    """Balanced accuracy: the mean over true classes of each class's recall."""
    y, p = np.asarray(y_true).astype(str), np.asarray(y_pred).astype(str)
    return float(np.mean([(p[y == c] == c).mean() for c in np.unique(y)]))


def mae(y_true, y_pred) -> float:
    """Mean absolute error."""
    return float(np.abs(np.asarray(y_true, float) - np.asarray(y_pred, float)).mean())


def compare(y_true, pred_model, pred_base, regression: bool, n: int = 2000, seed: int = 0) -> dict:
    """A model against a baseline on the same scans: :func:`paired_gap` of the headline metric
    (MAE for regression, so a negative gap is the model's win; balanced accuracy otherwise, with
    resampling within each true class and McNemar's p as ``mcnemar_p``)."""
    if regression:
        return paired_gap(mae, np.asarray(y_true, float), np.asarray(pred_model, float), np.asarray(pred_base, float), n, seed)
    out = paired_gap(balanced_accuracy, y_true, pred_model, pred_base, n, seed, strata=np.asarray(y_true))
    return out | {"mcnemar_p": mcnemar(y_true, pred_model, pred_base)}
