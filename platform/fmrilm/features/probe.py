"""Sanity probe (fMRI-LM Fig. 3): do the descriptors carry a phenotype, next to FC + logistic?

Both models are scikit-learn logistic regressions with the penalty chosen by inner
cross-validation on the training subjects only, evaluated on held-out subjects.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from fmrilm import storage
from fmrilm.errors import UserError
from fmrilm.data.signal import robust_scale
from fmrilm.features.connectivity import pearson_fc


def _fit_score(x_train, y_train, x_test, y_test) -> float:
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    import warnings

    folds = int(min(5, np.bincount(y_train).min()))
    model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=10, cv=max(2, folds), max_iter=2000, scoring="neg_log_loss"))
    with warnings.catch_warnings():  # scikit-learn's announcements of future defaults
        warnings.simplefilter("ignore", FutureWarning)
        model.fit(x_train, y_train)
    return float(balanced_accuracy_score(y_test, model.predict(x_test)))


def fc_vectors(series: dict[str, tuple[np.ndarray, float]], scan_ids: list[str]) -> np.ndarray:
    """Upper-triangle Pearson FC of robust-scaled series, ``[scans, rois*(rois-1)/2]``."""
    first = series[scan_ids[0]][0]
    iu = np.triu_indices(first.shape[0], 1)
    return np.stack([pearson_fc(robust_scale(series[s][0]))[iu] for s in scan_ids])


def sex_probe(features_uri: str, series: dict[str, tuple[np.ndarray, float]], meta: pd.DataFrame,
              test_splits: tuple[str, ...] = ("val", "test")) -> dict:
    """Balanced accuracy for sex from descriptor z-scores and from FC, train -> held-out subjects.

    ``meta`` has ``scan_id``, ``split`` and ``sex``; ``series`` maps scan_id to its raw series.
    """
    feats = pq.read_table(storage.resolve(features_uri).path, filesystem=storage.resolve(features_uri).fs).to_pandas()
    df = feats.merge(meta[["scan_id", "sex"]], on="scan_id")
    df = df[df["error"].isna() & df["sex"].isin(["M", "F"])]
    zcols = [c for c in df.columns if c.startswith("z.")]
    train, test = df[df["split"] == "train"], df[df["split"].isin(test_splits)]
    if train["sex"].nunique() < 2 or test["sex"].nunique() < 2:
        raise UserError("the sex probe needs both sexes in the train and the held-out splits: set probe=false, or add "
                        "subjects of both sexes to each split")
    y_train, y_test = (train["sex"] == "F").to_numpy(int), (test["sex"] == "F").to_numpy(int)
    return {
        "n_train": int(len(train)), "n_test": int(len(test)), "chance": 0.5,
        "descriptors_logistic": _fit_score(train[zcols].to_numpy(), y_train, test[zcols].to_numpy(), y_test),
        "fc_logistic": _fit_score(fc_vectors(series, list(train["scan_id"])), y_train, fc_vectors(series, list(test["scan_id"])), y_test),
    }
