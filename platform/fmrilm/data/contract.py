"""The input contract of a trained tokenizer: which data it was trained on and can read.

A tokenizer embeds ROIs by their position in the atlas it was trained on, so ROI 7 of another
atlas silently reuses ROI 7's embedding, and a scan at another TR patches time differently. The
contract (written into the artifact's ``config.json``, copied into every LM export) records the
atlas name and ROI labels, the native TRs of the training scans, the windowing (window, stride,
patch, normalisation, target TR) and the dataset versions. Every consumer checks a dataset's
manifest against it before reading a scan: another atlas or ROI set is an error naming both,
unless the user maps it by position (``data.atlas_mapping=position``); another TR is an error
unless the contract resamples to a target TR. The contract also summarises the normalised
signal of a sample of training windows (spread, lag-1 autocorrelation, extreme values): a
dataset whose mean statistic lies more than ``SHIFT_BOUND`` training SDs away is reported as a
distribution shift (a warning, not an error: the model still reads it). Pure functions, no I/O.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from fmrilm.errors import UserError

AtlasMapping = Literal["refuse", "position"]
TR_TOLERANCE = 0.01  # relative: 0.72 s and 0.7201 s are the same TR
SHIFT_BOUND = 3.0  # a dataset's mean window statistic this many training SDs away is a distribution shift
EXTREME = 4.0  # |normalised value| above this counts as extreme


class ContractError(UserError, ValueError):
    """A dataset does not match what a trained model was trained on."""


def _atlas(manifest: dict) -> tuple[str, int, tuple[str, ...] | None]:
    labels = manifest.get("roi_labels")
    return str(manifest.get("atlas")), int(manifest["n_rois"]), tuple(labels) if labels else None


def _describe(name: str, n_rois: int) -> str:
    return f"atlas {name!r} ({n_rois} ROIs)"


def same_atlas(a: dict, b: dict) -> bool:
    """Whether two manifests (or contracts) name the same atlas with the same ROIs in the same
    order (labels compared where both have them)."""
    (na, ra, la), (nb, rb, lb) = _atlas(a), _atlas(b)
    return na == nb and ra == rb and (la is None or lb is None or la == lb)


def input_contract(manifests: list[dict], window: int, stride: int, patch: int, normalise: bool, target_tr: float | None,
                   atlas_mapping: AtlasMapping = "refuse") -> dict:
    """The contract of a model trained on the datasets of ``manifests`` with this windowing:
    ``{"atlas", "n_rois", "roi_labels", "tr" (sorted native TRs), "target_tr", "window",
    "stride", "patch", "normalise", "datasets" (name -> version)}``. Training datasets of
    different atlases raise :class:`ContractError` unless ``atlas_mapping`` is ``"position"``
    (then the first dataset's atlas is recorded)."""
    if not manifests:
        raise ContractError("an input contract needs at least one training dataset")
    first = manifests[0]
    for m in manifests[1:]:
        if not same_atlas(first, m) and atlas_mapping != "position":
            raise ContractError(
                f"training datasets {first['dataset']!r} ({_describe(*_atlas(first)[:2])}) and {m['dataset']!r} "
                f"({_describe(*_atlas(m)[:2])}) use different atlases, and the tokenizer embeds ROIs by position: "
                "train on datasets of one atlas (data.datasets=[...]), or set data.atlas_mapping=position to share the slots")
    name, n_rois, labels = _atlas(first)
    trs = sorted({round(float(t), 6) for m in manifests for t in (m.get("tr") or [])})
    return {"atlas": name, "n_rois": n_rois, "roi_labels": list(labels) if labels else None, "tr": trs, "target_tr": target_tr,
            "window": window, "stride": stride, "patch": patch, "normalise": normalise,
            "datasets": {m["dataset"]: m.get("version") for m in manifests}}


def check_dataset(contract: dict, manifest: dict, model: str, atlas_mapping: AtlasMapping = "refuse",
                  target_tr: float | None = None) -> list[str]:
    """Check one dataset's ``manifest`` against the ``contract`` of ``model`` (a URI, for the
    message) read with ``target_tr`` (the TR its scans are resampled to, if any). Raises
    :class:`ContractError` for another ROI count, another atlas or ROI order (unless
    ``atlas_mapping`` is ``"position"``) or a native TR the model never saw when nothing
    resamples; returns warnings for what was let through (mapped by position)."""
    name, n_rois, _ = _atlas(manifest)
    ds = manifest["dataset"]
    want = _describe(contract["atlas"], contract["n_rois"])
    if n_rois != contract["n_rois"]:
        raise ContractError(f"dataset {ds!r} is {_describe(name, n_rois)} but {model} was trained on {want}: "
                            "its ROI embeddings are per position, so it cannot read these scans; use datasets of its atlas")
    warnings = []
    if not same_atlas(contract, manifest):
        if atlas_mapping != "position":
            raise ContractError(f"dataset {ds!r} is {_describe(name, n_rois)} but {model} was trained on {want} (other ROI "
                                "names or order): use datasets of its atlas, or set data.atlas_mapping=position to read ROI i "
                                "of this atlas as ROI i of the training atlas")
        warnings.append(f"dataset {ds!r} ({_describe(name, n_rois)}) read by position as {want} (data.atlas_mapping=position)")
    if target_tr is None and contract.get("tr"):
        unseen = [t for t in manifest.get("tr") or [] if not any(abs(t - s) <= TR_TOLERANCE * s for s in contract["tr"])]
        if unseen:
            raise ContractError(f"dataset {ds!r} has TR {unseen} s but {model} was trained on TR {contract['tr']} s without "
                                "resampling: its patches would span another duration; train the tokenizer with data.target_tr "
                                "set, or use datasets at its TR")
    return warnings


def check_datasets(contract: dict | None, manifests: list[dict], model: str, atlas_mapping: AtlasMapping = "refuse",
                   target_tr: float | None = None) -> list[str]:
    """:func:`check_dataset` over ``manifests``; the warnings of all of them. A model without a
    contract (older than contracts) is not checked."""
    if contract is None:
        return []
    return [w for m in manifests for w in check_dataset(contract, m, model, atlas_mapping, target_tr)]


def signal_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    """Statistics of each window of normalised signal ``x [n, rois, time]``, each ``[n]``:
    ``spread`` (mean over ROIs of the std over time), ``lag1`` (mean over ROIs of the lag-1
    autocorrelation: smoothness, which depends on TR and filtering) and ``extreme`` (fraction of
    values beyond ``EXTREME``)."""
    x = np.asarray(x, np.float64)
    centred = x - x.mean(-1, keepdims=True)
    var = (centred**2).mean(-1)
    lag1 = np.divide((centred[..., 1:] * centred[..., :-1]).mean(-1), var, out=np.zeros_like(var), where=var > 1e-12)
    return {"spread": np.sqrt(var).mean(-1), "lag1": lag1.mean(-1), "extreme": (np.abs(x) > EXTREME).mean((-1, -2))}


def signal_summary(x: np.ndarray) -> dict[str, dict[str, float]]:
    """``{statistic: {"mean", "sd"}}`` of :func:`signal_stats` over the windows ``x [n, rois, time]``."""
    return {k: {"mean": float(v.mean()), "sd": float(v.std())} for k, v in signal_stats(x).items()}


def shift_warnings(contract: dict, x: np.ndarray, dataset: str, model: str) -> list[str]:
    """Warnings for each statistic whose mean over ``dataset``'s windows ``x [n, rois, time]``
    lies more than ``SHIFT_BOUND`` training SDs from the training mean the ``contract`` of
    ``model`` records; none when it records no signal summary or ``x`` is empty."""
    reference = contract.get("signal")
    if not reference or len(x) == 0:
        return []
    out = []
    for name, value in signal_summary(x).items():
        ref = reference.get(name)
        if ref is None:
            continue
        distance = abs(value["mean"] - ref["mean"]) / max(ref["sd"], 1e-3)
        if distance > SHIFT_BOUND:
            out.append(f"distribution shift: dataset {dataset!r} has mean window {name} {value['mean']:.3f} where {model} "
                       f"trained on {ref['mean']:.3f} (sd {ref['sd']:.3f}; {distance:.1f} SDs, bound {SHIFT_BOUND:g}): "
                       "its preprocessing or TR may differ from the training data's")
    return out
