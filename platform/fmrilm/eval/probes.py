"""Linear probes of every representation the chain passes the scan through, side by side.

On the held-out subjects alone, a cross-validated linear model predicts each target from: FC on
the time points a prompt shows and on the whole scan (the input), the tokenizer's scan vector
(its encoder features, :mod:`fmrilm.models.scan_token`), its codes (how often each code occurs,
and the FC of the signal the tokenizer's decoder rebuilds from the codes alone), and the LM's
last hidden state where it answers (pretrained and instruct exports). A
representation that has lost the signal scores at chance, so the stage that loses it shows.
Probes measure what is linearly decodable; they are not the model's answers.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


def code_histogram(codes: np.ndarray, num_codes: int) -> np.ndarray:
    """``codes [channels, steps]`` -> how often each code occurs, ``[num_codes]`` fractions: what a
    reader that ignores order and channel (a bag of tokens) can see."""
    codes = np.asarray(codes).ravel()
    return (np.bincount(codes, minlength=num_codes)[:num_codes] / max(codes.size, 1)).astype(np.float32)


def tokenizer_representations(ids: list[str], codes: dict[str, np.ndarray], feats: dict[str, np.ndarray], decoder,
                              vectors: dict[str, np.ndarray] | None = None) -> dict:
    """What a linear probe reads of the tokenizer's outputs for scans ``ids``, name -> a function
    giving ``[scans, dim]``: how often each code occurs (a bag of tokens), the FC of what the
    tokenizer's decoder rebuilds from the codes alone (the coupling the codes keep; in the roi
    layout carried by which codes co-occur), and, with per-ROI encoder features, the scan
    vector (``vectors`` where already computed). A representation whose shape differs between
    scans (several atlases) is left out."""
    from fmrilm.models.scan_token import scan_vector

    reps = {}
    if len({codes[s].shape for s in ids}) == 1:
        reps["codes: histogram"] = lambda: np.stack([code_histogram(codes[s], decoder.num_codes) for s in ids])
        reps["codes: decoded FC"] = lambda: np.stack([decoder.fc(s, codes[s]) for s in ids])
    if feats and len({feats[s].shape[0] for s in ids}) == 1 and feats[ids[0]].shape[0] > 1:  # per-ROI features (roi layout)
        vectors = vectors or {}
        reps["scan vector (encoder features)"] = lambda: np.stack([vectors[s] if s in vectors else scan_vector(feats[s]) for s in ids])
    return reps


def cv_probe(x: np.ndarray, y: np.ndarray, regression: bool, folds: int = 5, seed: int = 0) -> dict[str, float]:
    """Out-of-fold predictions of a standardised linear model (logistic / ridge, penalty chosen
    inside each training fold) over ``x [n, d]``: ``balanced_accuracy`` (and ``auc`` for two
    classes), or ``mae`` and ``pearson_r``; ``{}`` when there are too few rows per class."""
    from sklearn.linear_model import LogisticRegressionCV, RidgeCV
    from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from fmrilm.eval import metrics

    x = np.nan_to_num(np.asarray(x, np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if regression:
            y = np.asarray(y, float)
            if len(y) < 2 * folds:
                return {}
            model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 5, 15)))
            pred = cross_val_predict(model, x, y, cv=KFold(folds, shuffle=True, random_state=seed))
            return metrics.regression(y, pred)
        y = np.asarray(y, dtype=object)
        classes, counts = np.unique(y, return_counts=True)
        k = int(min(folds, counts.min()))
        if len(classes) < 2 or k < 3:  # two folds of two per class leave one per class in a fold: no inner CV to fit the penalty
            return {}
        model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=8, cv=min(3, k - 1), max_iter=3000))
        proba = cross_val_predict(model, x, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed), method="predict_proba")
        pred = classes[proba.argmax(1)]
        return metrics.classification(y, pred, np.log(np.clip(proba, 1e-12, 1)), list(classes))


@torch.no_grad()
def answer_states(model, prompts: list) -> np.ndarray:
    """The LM's last-layer hidden state at the last token of each prompt (where the answer's
    first token is predicted), ``[prompts, hidden]``; ``prompts`` are
    :class:`~fmrilm.data.lm_sequences.Example` objects."""
    from fmrilm.data.lm_sequences import as_row, attention_mask
    from fmrilm.models.fmri_lm import fmri_inputs

    out = []
    for p in prompts:
        t = {k: torch.from_numpy(v) for k, v in as_row(p).items()}
        res = model(input_ids=t["ids"], attention_mask=attention_mask(t["segments"], t["groups"]), position_ids=t["positions"],
                    use_cache=False, output_hidden_states=True, **fmri_inputs(t))
        out.append(res.hidden_states[-1][0, -1].float().numpy())
    return np.stack(out)
