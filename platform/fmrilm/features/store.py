"""The features store: what ``fmrilm features build`` commits under ``<dataset>/features/``, read
by every later stage (captions for alignment, pretraining and prompts; descriptor z-scores for the
evaluation's descriptor baseline; the split record of the build for the held-out checks).

``<dataset>/features/manifest.json`` names the committed build (its ``key`` folder and summary);
the readers locate files from the dataset folder, so a copied or moved dataset keeps its build.
"""

from __future__ import annotations

import json

import pandas as pd

from fmrilm import storage
from fmrilm.data import table


def read_json(loc: storage.Location) -> dict | None:
    """A JSON file's content, or None where it does not exist."""
    try:
        return json.loads(storage.read_text(loc))
    except FileNotFoundError:
        return None


def builds(data: str, datasets: list[str] | None):
    """``(dataset location, features manifest)`` of every committed features build under ``data``."""
    for loc, manifest in table.find_datasets(data, datasets):
        fm = read_json(features_root(loc).join("manifest.json"))
        if fm is not None:
            yield loc, fm


def features_root(dataset: storage.Location) -> storage.Location:
    """The folder of a dataset's features builds: ``<dataset>/features/`` holding ``manifest.json``
    (the committed build) and one folder per build key."""
    return dataset.join("features")


def build_file(dataset: storage.Location, fm: dict, name: str) -> storage.Location:
    """A file of a committed features build, located from the dataset folder (the dataset may
    have been copied or moved since the URIs in its summary were written)."""
    return features_root(dataset).join(fm["key"], name)


def read_captions(data: str, datasets: list[str] | None = None) -> dict[str, list[str]]:
    """Captions per scan (``scan_id -> [caption 0, caption 1, ...]``) from the committed features
    builds of the datasets under ``data``; datasets without a build contribute nothing."""
    out: dict[str, list[str]] = {}
    for loc, fm in builds(data, datasets):
        where = build_file(loc, fm, "captions.parquet")
        caps = pd.read_parquet(where.path, filesystem=where.fs).sort_values(["scan_id", "caption_index"])
        for scan_id, group in caps.groupby("scan_id", sort=False):
            out[scan_id] = group["caption"].tolist()
    return out


def features_split(data: str, datasets: list[str] | None = None) -> dict | None:
    """The split record of the committed features builds under ``data`` (their references and
    z-score statistics were fitted on these ``trained_subjects``), or None without a build."""
    recs = [fm["summary"].get("split") or {} for _, fm in builds(data, datasets)]
    if not recs:
        return None
    return {"policy": next((r.get("policy") for r in recs if r.get("policy")), None),
            "trained_subjects": sorted({s for r in recs for s in r.get("trained_subjects") or []})}


def read_descriptors(data: str, datasets: list[str] | None = None) -> pd.DataFrame:
    """Descriptor z-scores (``scan_id`` + ``z.*`` columns) of the committed features builds under
    ``data``; scans whose descriptors failed are left out. Empty if no dataset has a build."""
    parts = []
    for loc, fm in builds(data, datasets):
        where = build_file(loc, fm, "features.parquet")
        df = pd.read_parquet(where.path, filesystem=where.fs)
        parts.append(df[df["error"].isna()][["scan_id", *[c for c in df.columns if c.startswith("z.")]]])
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["scan_id"])


def first_captions(captions: dict[str, list[str]]) -> dict[str, str]:
    """``scan_id -> description``: each scan's first caption (what ``descriptions: true`` prompts show)."""
    return {sid: caps[0] for sid, caps in captions.items() if caps}
