"""A trained tokenizer as a Brainmarks model (https://github.com/MedARC-AI/Brainmarks).

Brainmarks evaluates frozen fMRI encoders (logistic regression and probes on HCP-YA, AABC,
ABIDE, ADHD-200, ADNI, PPMI, NSD) beside BrainLM, Brain-JEPA, NeuroSTORM and a connectome
baseline. Its models are plugins of the namespace package ``brainmarks.models``; fmrilm ships
one (``brainmarks/models/fmrilm.py`` beside this package) that registers every tokenizer a user
exported with ``fmrilm export brainmarks`` as ``fmrilm_<name>``.

An export is a record (``<FMRILM_BRAINMARKS_DIR>/<name>.json``, default
``~/.config/fmrilm/brainmarks``): the tokenizer's URI, the Brainmarks input space it reads
(a parcellation whose ROI count equals the tokenizer's; its atlas must be that space unless the
user maps ROIs by position) and the TR its patches span. Per Brainmarks sample
(``bold [time, rois]``, z-scored per ROI, and ``tr``), :class:`ScanTransform` does what the
training pipeline did (per-ROI robust scaling, which the z-scoring does not change, resampling to
the tokenizer's TR, windows of its length and stride; a clip shorter than one window is padded
with zeros, the median) and :class:`TokenizerEncoder` returns Brainmarks' three embeddings:

- ``cls`` ``[batch, 1, rois * (rois - 1) / 2]``: the scan vector, the encoder features'
  connectivity over the clip (:func:`fmrilm.models.scan_token.scan_vector`), what the LM reads;
- ``reg``: none;
- ``patch`` ``[batch, rois, width]``: each ROI's encoder features averaged over the clip.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import torch

from fmrilm import storage
from fmrilm.artifacts import tokenizer as artifact
from fmrilm.data.signal import resample, robust_scale, windows
from fmrilm.errors import UserError
from fmrilm.models.scan_token import scan_vector

REGISTRY_ENV = "FMRILM_BRAINMARKS_DIR"
PREFIX = "fmrilm_"


class BrainmarksError(UserError, ValueError):
    """A tokenizer cannot be offered to Brainmarks as asked."""


def registry_dir() -> str:
    """Where export records live: ``FMRILM_BRAINMARKS_DIR``, else ``~/.config/fmrilm/brainmarks``."""
    return os.environ.get(REGISTRY_ENV) or os.path.join(os.path.expanduser("~"), ".config", "fmrilm", "brainmarks")


def space_rois() -> dict[str, int]:
    """Brainmarks' input spaces and their dimension (ROIs of a parcellation, vertices or voxels)."""
    try:
        from brainmarks.readers import DATA_DIMS
    except ImportError as err:
        raise BrainmarksError(f"Brainmarks is not installed ({err}): pip install 'fmrilm[brainmarks]'") from None
    return dict(DATA_DIMS)


def record(tokenizer_uri: str, name: str, space: str | None, spaces: dict[str, int], atlas_mapping: str = "refuse") -> dict:
    """The export record of the tokenizer at ``tokenizer_uri`` reading Brainmarks' ``space`` (None:
    the tokenizer's own atlas; ``spaces``: space -> dimension); raises :class:`BrainmarksError`
    naming both sides when the tokenizer cannot read that space, or when ``name`` cannot be a
    Python model name."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_]*", name):
        raise BrainmarksError(f"--name {name!r}: letters, digits and _ only (it becomes the model name {PREFIX}<name>)")
    cfg = artifact.read_config(tokenizer_uri)
    if cfg["model"].get("layout", "roi") != "roi":
        raise BrainmarksError(f"tokenizer {tokenizer_uri} has whole-brain tokens (model.layout={cfg['model']['layout']}); "
                              "Brainmarks reads per-ROI encoder features: export a tokenizer with model.layout=roi")
    contract = cfg.get("contract") or {}
    space = space or contract.get("atlas")
    rois = contract.get("n_rois")
    if space not in spaces:
        raise BrainmarksError(f"--space {space!r} is not a Brainmarks input space; choose one of {sorted(spaces)}")
    if rois != spaces[space]:
        raise BrainmarksError(f"tokenizer {tokenizer_uri} reads {rois} ROIs (atlas {contract.get('atlas')!r}) but Brainmarks' "
                              f"space {space!r} has {spaces[space]}: train a tokenizer on scans parcellated in {space}")
    if contract.get("atlas") != space and atlas_mapping != "position":
        raise BrainmarksError(f"tokenizer {tokenizer_uri} was trained on atlas {contract.get('atlas')!r}, not {space!r}: export "
                              f"a tokenizer trained on {space} scans, or pass --atlas-mapping position to read ROI i of {space} "
                              "as its ROI i")
    tr = cfg["data"].get("target_tr") or (contract.get("tr") or [None])[0]
    if tr is None or (not cfg["data"].get("target_tr") and len(contract.get("tr") or []) > 1):
        raise BrainmarksError(f"tokenizer {tokenizer_uri} was trained on TRs {contract.get('tr')} s without resampling, so no one "
                              "TR says how long its patches are: train it with data.target_tr set")
    return {"name": name, "model": PREFIX + name, "tokenizer": storage.resolve(tokenizer_uri).uri, "space": space, "tr": float(tr),
            "atlas": contract.get("atlas"), "n_rois": rois, "atlas_mapping": atlas_mapping,
            "window": cfg["data"]["window"], "stride": cfg["data"]["stride"], "normalise": cfg["data"]["normalise"]}


def write_record(rec: dict) -> str:
    """Write ``rec`` to the registry; returns the file's path."""
    os.makedirs(registry_dir(), exist_ok=True)
    path = os.path.join(registry_dir(), f"{rec['name']}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rec, f, indent=1)
    return path


def registered() -> dict[str, dict]:
    """``model name -> record`` of every export in the registry (unreadable files are skipped)."""
    folder, out = registry_dir(), {}
    if not os.path.isdir(folder):
        return out
    for file in sorted(os.listdir(folder)):
        if file.endswith(".json"):
            try:
                with open(os.path.join(folder, file), encoding="utf-8") as f:
                    rec = json.load(f)
                out[rec["model"]] = rec
            except (OSError, ValueError, KeyError):
                continue
    return out


class ScanTransform:
    """Brainmarks sample ``{"bold": [time, rois], "tr", ...}`` -> ``{"windows": [n_windows, rois, window]}``,
    prepared as the tokenizer's training pipeline prepared its windows."""

    def __init__(self, rec: dict):
        self.rec = rec

    def __call__(self, sample: dict) -> dict:
        ts = np.asarray(sample["bold"], np.float64).T  # [rois, time]
        if ts.shape[0] != self.rec["n_rois"]:
            raise BrainmarksError(f"{self.rec['model']} reads {self.rec['n_rois']} ROIs ({self.rec['space']}), the sample has {ts.shape[0]}")
        if self.rec["normalise"]:
            ts = robust_scale(ts)
        tr = float(sample["tr"])
        if abs(tr - self.rec["tr"]) > 1e-6:
            ts = resample(ts, tr, self.rec["tr"])
        if ts.shape[1] < self.rec["window"]:
            ts = np.pad(ts, ((0, 0), (0, self.rec["window"] - ts.shape[1])))
        return {"windows": torch.from_numpy(windows(ts, self.rec["window"], self.rec["stride"]).astype(np.float32))}


class TokenizerEncoder(torch.nn.Module):
    """Windows ``[batch, n_windows, rois, window]`` -> ``(cls [batch, 1, rois * (rois - 1) / 2], None,
    patch [batch, rois, width])`` from the frozen tokenizer of an export record (see the module docstring)."""

    def __init__(self, rec: dict):
        super().__init__()
        self.__space__ = rec["space"]
        self.tokenizer, _ = artifact.load_tokenizer(rec["tokenizer"])
        self.tokenizer.requires_grad_(False)

    @torch.no_grad()
    def forward(self, batch: dict):
        x = batch["windows"].float()
        b, n, r, t = x.shape
        _, feats = self.tokenizer.tokenize_with_features(x.reshape(b * n, r, t))  # [b * n, rois, patches, width]
        width = feats.shape[-1]
        feats = feats.reshape(b, n, r, -1, width).permute(0, 2, 1, 3, 4).reshape(b, r, -1, width)  # [b, rois, steps, width]
        cls = torch.stack([torch.from_numpy(scan_vector(f.numpy())) for f in feats])[:, None, :]
        return cls, None, feats.mean(2)


def load(rec: dict) -> tuple[ScanTransform, TokenizerEncoder]:
    """Brainmarks' ``(transform, model)`` pair of an export record."""
    return ScanTransform(rec), TokenizerEncoder(rec).eval()
