"""Baselines on the same train/test scans as the LM (Brainmarks: FC + linear is hard to beat).

* ``majority`` / ``mean``: the training split's most frequent class or mean value.
* ``fc_linear``: upper-triangle Pearson FC of the robust-scaled series, standardised, then a
  logistic regression (classification) or ridge regression (regression) whose penalty is chosen
  by cross-validation on the training subjects only (nested inside the train/test split), on
  the time points the LM's prompt shows; ``fc_linear_whole_scan`` the same on the whole scan.
* ``descriptors_linear``: the same models on the descriptor z-scores of ``fmrilm features``.
* ``fc_linear_deconfounded``: ``fc_linear`` after regressing site (one-hot) and head motion
  (mean framewise displacement) out of every FC edge, the regression fitted on the training
  scans only (:func:`deconfound`); reported when the scans span several sites or record motion.
* the classical readers beyond FC (pre-whitened FC, timescale, lagged FC, windowed FC,
  amplitude moments, combined) and the best of them: :mod:`fmrilm.eval.classical`.
* ``planted_pattern`` (synthetic cohorts): the generator's true effect pattern projected onto each scan's
  FC (:func:`fmrilm.data.synth.oracle_scores`), calibrated on the training scans by a
  one-feature logistic/linear fit on the whole scan. Not an upper bound: the generator's site
  effect is not in it, so a model that also reads site can beat it.

Each baseline returns predictions (and class scores) for the test scans.
"""

from __future__ import annotations

import warnings

import numpy as np


def _quiet(fit, *args):
    with warnings.catch_warnings():  # convergence chatter and scikit-learn's announcements of future defaults
        warnings.simplefilter("ignore")
        return fit(*args)


def majority(y_train: np.ndarray, n_test: int, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The most frequent training class for every test scan, with one-hot scores."""
    values, counts = np.unique(y_train, return_counts=True)
    top = values[np.argmax(counts)]
    scores = np.tile([1.0 if c == top else 0.0 for c in classes], (n_test, 1))
    return np.full(n_test, top, dtype=object), scores


def fit_classifier(x_train, y_train, x_test, classes: list[str], seed: int = 0) -> dict:
    """Impute missing values with the training mean, standardise, then logistic regression with
    the L2 penalty chosen by inner stratified CV on the training rows (the default penalty, C = 1,
    when a class has a single training row: nothing to cross-validate). Returns ``{"pred"
    [test], "scores" (log-probabilities [test, classes]), "cv_score"}``: the mean inner-CV
    neg. log-loss at the chosen penalty (None without CV)."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    smallest = int(np.unique(y_train, return_counts=True)[1].min())
    if smallest < 2:
        head = LogisticRegression(max_iter=3000, random_state=seed)
    else:
        head = LogisticRegressionCV(Cs=10, cv=min(5, smallest), max_iter=3000, scoring="neg_log_loss", random_state=seed)
    model = make_pipeline(SimpleImputer(keep_empty_features=True), StandardScaler(), head)
    _quiet(model.fit, x_train, y_train)
    proba = model.predict_proba(x_test)
    order = list(model.classes_)
    scores = np.full((len(x_test), len(classes)), -np.inf)
    for j, c in enumerate(classes):
        if c in order:
            scores[:, j] = np.log(np.clip(proba[:, order.index(c)], 1e-12, 1))
    cv = None
    if isinstance(head, LogisticRegressionCV):
        fold_scores = next(iter(head.scores_.values()))  # [folds, Cs]; the same for every class
        cv = float(fold_scores.mean(0).max())
    return {"pred": np.asarray(model.predict(x_test), dtype=object), "scores": scores, "cv_score": cv}


def linear_classifier(x_train, y_train, x_test, classes: list[str], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fit_classifier`'s ``(predicted classes, log-probabilities [test, classes])``."""
    out = fit_classifier(x_train, y_train, x_test, classes, seed)
    return out["pred"], out["scores"]


def fit_regressor(x_train, y_train, x_test) -> dict:
    """Training-mean imputation, standardisation and ridge regression with the penalty chosen by
    leave-one-out CV on the training rows; returns ``{"pred" [test], "cv_score"}`` (the LOO
    neg. mean squared error at the chosen penalty)."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ridge = RidgeCV(alphas=np.logspace(-3, 4, 15))
    model = make_pipeline(SimpleImputer(keep_empty_features=True), StandardScaler(), ridge)
    _quiet(model.fit, x_train, np.asarray(y_train, float))
    return {"pred": model.predict(x_test), "cv_score": float(ridge.best_score_)}


def linear_regressor(x_train, y_train, x_test) -> np.ndarray:
    """:func:`fit_regressor`'s predictions."""
    return fit_regressor(x_train, y_train, x_test)["pred"]


def fc_matrix(series: np.ndarray) -> np.ndarray:
    """Pearson FC ``[rois, rois]`` of a robust-scaled series ``[rois, time]``."""
    from fmrilm.data.signal import robust_scale
    from fmrilm.features.connectivity import pearson_fc

    return pearson_fc(robust_scale(series))


def upper(fc: np.ndarray) -> np.ndarray:
    """Upper triangle (no diagonal) of ``[..., rois, rois]`` as ``[..., rois*(rois-1)/2]``."""
    iu = np.triu_indices(fc.shape[-1], 1)
    return fc[..., iu[0], iu[1]]


def oracle_scores(params: dict, fcs: np.ndarray) -> dict[str, np.ndarray]:
    """The synthetic generator's true linear scores (``sex``: higher = more female, ``age``:
    higher = older) for FC matrices ``[scans, rois, rois]``."""
    from fmrilm.data.synth import SynthParams, oracle_scores as truth

    return truth(SynthParams(**params), fcs)


def confounds(sites: list, mean_fd: list, train_sites: list, train_fd: list) -> np.ndarray:
    """Confound matrix ``[scans, n_sites - 1 + 1]``: one-hot site (the training sites but the
    first; an unseen site is all zeros) and mean FD (missing values at the training mean; left
    out when no training scan records it)."""
    levels = sorted({str(s) for s in train_sites})[1:]
    cols = [[float(str(s) == level) for level in levels] for s in sites]
    fd_train = np.asarray([np.nan if v is None else float(v) for v in train_fd], float)
    if np.isfinite(fd_train).any():
        fill = float(np.nanmean(fd_train))
        for row, v in zip(cols, mean_fd):
            row.append(fill if v is None or not np.isfinite(float(v)) else float(v))
    return np.asarray(cols, float).reshape(len(sites), -1)


def deconfound(x_train: np.ndarray, c_train: np.ndarray, x_test: np.ndarray, c_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features ``x [scans, features]`` with the confounds ``c [scans, confounds]`` regressed out
    by least squares (with an intercept) fitted on the training scans only; returns
    ``(train residuals, test residuals)``, the training mean added back."""
    design = np.column_stack([np.ones(len(c_train)), c_train])
    beta, *_ = np.linalg.lstsq(design, x_train, rcond=None)
    mean = x_train.mean(0)
    return x_train - design @ beta + mean, x_test - np.column_stack([np.ones(len(c_test)), c_test]) @ beta + mean
