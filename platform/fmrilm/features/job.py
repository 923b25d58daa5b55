"""``fmrilm features build SPEC``: descriptors and captions for every scan of every dataset.

Per dataset (datasets differ in ROIs and networks, so each has its own reference):

1. the reference (group gradients, group ICA maps) is fitted on training-split scans only;
2. a Ray Data map over the scan table's shards computes raw descriptors, one output part per
   shard, skipped when already there (so an interrupted build resumes per shard); a scan whose
   descriptors fail is recorded with its reason and does not stop the others;
3. z-scores use training-split statistics only; captions are sampled from them, seeded;
4. ``features.parquet``, ``captions.parquet``, ``stats.json`` and ``descriptors.png`` are
   written under ``<dataset>/features/<key>/`` and committed by ``<dataset>/features/manifest.json``.

``key`` hashes the scan-table version and every spec field that changes the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from pydantic import Field

from fmrilm.errors import UserError
from fmrilm import runtime, storage
from fmrilm.config import StageSpec
from fmrilm.data.pipeline import DataSpec
from fmrilm.data import schema, table
from fmrilm.data import splits
from fmrilm.data.splits import SplitPolicy
from fmrilm.features import captions as captions_mod
from fmrilm.features import store
from fmrilm.features.descriptors import Reference, build_reference, scan_descriptors, zscore, zscore_stats

log = logging.getLogger("fmrilm.features")


class FeaturesError(UserError, ValueError):
    """A dataset cannot be described (no network map, empty train split, ...)."""


class FeaturesSpec(StageSpec):
    """Spec of ``jobs/features.yaml``."""

    kind: Literal["features"] = "features"
    data: DataSpec = DataSpec()
    ica_components: int = Field(8, ge=2)
    graph_density: float = Field(0.1, gt=0, le=1)
    reference_scans: int = Field(200, ge=1, description="at most this many training scans fit the reference")
    captions_per_scan: int = Field(3, ge=1)
    descriptors_per_caption: int = Field(4, ge=1)
    seed: int = 0
    use_ray: bool = True
    plot: bool = True
    probe: bool = Field(True, description="sex probe (descriptors vs FC + logistic) when labels allow")


def _key(manifest: dict, spec: FeaturesSpec, policy: SplitPolicy) -> str:
    fields = spec.model_dump(exclude={"kind", "data", "datasets", "use_ray", "plot", "probe"})
    payload = json.dumps({"version": manifest["version"], "policy": policy.model_dump(), **fields}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def describe_shard(item: dict) -> dict:
    """Ray Data map: raw descriptors of one scan-table shard -> one output part (skipped if present)."""
    dataset = storage.resolve(item["dataset_uri"])
    out_loc = storage.resolve(item["part_uri"])
    if storage.exists(out_loc):
        return {"shard": item["shard"], "scans": -1, "failed": "[]"}
    ref = Reference.from_bytes(storage.read_bytes(storage.resolve(item["reference_uri"])))
    t = pq.read_table(posixpath.join(dataset.path, item["shard"]), filesystem=dataset.fs,
                      columns=["scan_id", "n_rois", "n_timepoints", "tr", "timeseries"])
    rows, failed = [], []
    for row in t.to_pylist():
        ts = schema.timeseries(row["timeseries"], row["n_rois"], row["n_timepoints"])
        try:
            d = scan_descriptors(ts, row["tr"], ref, item["density"], item["seed"])
            rows.append({"scan_id": row["scan_id"], "error": None, **d})
        except (ValueError, np.linalg.LinAlgError) as err:
            failed.append({"scan_id": row["scan_id"], "reason": str(err)})
            rows.append({"scan_id": row["scan_id"], "error": str(err)})
    storage.write_parquet(out_loc, rows)
    return {"shard": item["shard"], "scans": len(rows), "failed": json.dumps(failed)}


def build_dataset(loc: storage.Location, manifest: dict, spec: FeaturesSpec) -> dict:
    """Descriptors + captions for one dataset; returns its summary (see module docstring)."""
    name = manifest["dataset"]
    policy = spec.data.split or splits.manifest_policy(manifest)
    key = _key(manifest, spec, policy)
    root = store.features_root(loc)
    work = root.join(key)
    previous = store.read_json(root.join("manifest.json"))
    if previous and previous.get("key") == key:
        log.info("%s: features up to date (%s)", name, key)
        return previous["summary"]

    networks = table.networks_of(manifest)
    meta = table.read_meta(loc, manifest).to_pandas()
    meta["split"] = splits.assign(meta, {name: manifest}, spec.data.split)
    train_ids = sorted(meta.loc[meta["split"] == "train", "scan_id"])
    if not train_ids:
        raise FeaturesError(f"dataset {name!r} has no training-split scans to fit the reference on")
    rng = np.random.default_rng(spec.seed)
    ref_ids = sorted(rng.choice(train_ids, size=min(spec.reference_scans, len(train_ids)), replace=False))

    ref_loc = work.join("reference.npz")
    if not storage.exists(ref_loc):
        series = table.read_series(loc, manifest, set(ref_ids))
        usable = [s for s in ref_ids if not schema.timeseries_problems(series[s][0])]  # bad scans are reported below
        ref = build_reference([series[s][0] for s in usable], networks, usable, spec.ica_components, spec.seed)
        storage.write_bytes(ref_loc, ref.to_bytes())

    items = [{"dataset_uri": loc.uri, "shard": s["path"], "reference_uri": ref_loc.uri,
              "part_uri": work.join("raw", posixpath.basename(s["path"])).uri,
              "density": spec.graph_density, "seed": spec.seed} for s in manifest["shards"]]
    results = runtime.data_map(describe_shard, items, f"features {name}", use_ray=spec.use_ray)
    raw = pd.concat([pq.read_table(posixpath.join(work.path, "raw", posixpath.basename(s["path"])), filesystem=work.fs).to_pandas()
                     for s in manifest["shards"]], ignore_index=True)
    raw = meta[["scan_id", "subject_id", "split", "sex", "age"]].merge(raw, on="scan_id", how="left")
    failed = raw[raw["error"].notna()][["scan_id", "error"]].to_dict("records")
    for f in failed:
        log.warning("%s: no descriptors for %s: %s", name, f["scan_id"], f["error"])
    names = [c for c in raw.columns if c not in ("scan_id", "subject_id", "split", "sex", "age", "error")]
    ok = raw["error"].isna()
    train_rows = raw[ok & (raw["split"] == "train")][names].to_dict("records")
    stats = zscore_stats(train_rows)  # training split only
    z = pd.DataFrame([zscore(r, stats) if good else {k: np.nan for k in names}
                      for r, good in zip(raw[names].to_dict("records"), ok)], columns=names)
    features = pd.concat([raw[["scan_id", "subject_id", "split", "error"]],
                          raw[names].add_prefix("raw."), z.add_prefix("z.")], axis=1)
    caption_rows = [row for sid, zrow, good in zip(raw["scan_id"], z.to_dict("records"), ok) if good
                    for row in captions_mod.captions_for_scan(sid, zrow, spec.seed, spec.captions_per_scan, spec.descriptors_per_caption)]

    storage.write_parquet(work.join("features.parquet"), features)
    storage.write_parquet(work.join("captions.parquet"), caption_rows)
    storage.write_text(work.join("stats.json"), json.dumps({k: {"mean": m, "sd": s} for k, (m, s) in stats.items()}, indent=1))
    if spec.plot:
        storage.write_bytes(work.join("descriptors.png"), plot_distributions(z[ok.to_numpy()], raw.loc[ok, "split"]))
    summary = {
        "dataset": name, "key": key, "scans": int(len(raw)), "described": int(ok.sum()), "failed": failed,
        "descriptors": len(names), "captions": len(caption_rows), "train_scans_for_reference": len(ref_ids),
        "features": storage.absolute(work.join("features.parquet").uri),
        "captions_table": storage.absolute(work.join("captions.parquet").uri),
        "example_caption": caption_rows[0]["caption"] if caption_rows else None,
        "resumed_shards": sum(1 for r in results if r["scans"] == -1),
        "sex_probe": _probe(loc, manifest, meta, work) if spec.probe else None,
        "split": splits.record(spec.data.split, meta, versions={name: manifest["version"]}),
    }
    storage.write_text(root.join("manifest.json"), json.dumps({"key": key, "source_version": manifest["version"],
                                                               "spec": spec.model_dump(mode="json"), "summary": summary}, indent=1))
    for old in storage.list_dir(root):
        if old not in (key, "manifest.json"):
            storage.delete_dir(root.join(old))
    return summary


def _probe(loc: storage.Location, manifest: dict, meta: pd.DataFrame, work: storage.Location) -> dict | None:
    """The sex probe when at least 4 labelled subjects of each sex are in train and held out."""
    from fmrilm.features.probe import sex_probe

    labelled = meta[meta["sex"].isin(["M", "F"])]
    held = labelled[labelled["split"] != "train"]
    train = labelled[labelled["split"] == "train"]
    if held["sex"].value_counts().min() < 4 or train["sex"].value_counts().min() < 4 or held["sex"].nunique() < 2:
        return None
    series = table.read_series(loc, manifest, set(labelled["scan_id"]))
    return sex_probe(work.join("features.parquet").uri, series, labelled)


def plot_distributions(z: pd.DataFrame, splits: pd.Series, n: int = 16) -> bytes:
    """PNG of the z-score distributions of ``n`` descriptors (the most variable), by split."""
    from fmrilm.plots import png_bytes, pyplot

    plt = pyplot()

    cols = list(z.var().sort_values(ascending=False).index[:n])
    rows = int(np.ceil(len(cols) / 4)) or 1
    fig, axes = plt.subplots(rows, 4, figsize=(16, 3 * rows), squeeze=False)
    for ax, col in zip(axes.flat, cols):
        for split in sorted(splits.unique()):
            ax.hist(z.loc[(splits == split).to_numpy(), col].dropna(), bins=20, alpha=0.5, label=split)
        ax.set_title(col, fontsize=8)
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("descriptor z-scores (training-split reference)")
    fig.tight_layout()
    return png_bytes(fig)


def check(spec: FeaturesSpec) -> list:
    """Checks before building: every dataset named exists; returns ``[(dataset location, manifest)]``
    of those selected."""
    found = table.find_datasets(spec.data.root, spec.data.datasets)
    unknown = sorted(set(spec.data.datasets or []) - {m["dataset"] for _, m in found})
    if unknown:
        raise FeaturesError(f"dataset(s) {unknown} not found under {spec.data.root}")
    return found


def run(spec: FeaturesSpec) -> dict:
    """Build features and captions for every selected dataset; returns ``{dataset: summary}``."""
    return {m["dataset"]: build_dataset(loc, m, spec) for loc, m in check(spec)}


def summary(result: dict) -> list[str]:
    """Lines a person reads after :func:`run` (``{dataset: build summary}``); the first is the headline."""
    lines = [", ".join(f"{k}: {v['described']}/{v['scans']} scans described" for k, v in result.items())]
    for name, s in result.items():
        lines.append(f"{name}: {s['descriptors']} descriptors, {s['captions']} captions, {len(s['failed'])} scan(s) failed, "
                     f"{s.get('resumed_shards', 0)} shard(s) resumed")
        lines += [f"warning: {name}: no descriptors for {f['scan_id']}: {f['error']}" for f in s["failed"]]
        if s.get("example_caption"):
            lines.append(f"{name} example caption: {s['example_caption']}")
        if s.get("sex_probe"):
            p = s["sex_probe"]
            lines.append(f"{name} sex probe (balanced accuracy, {p['n_train']} train -> {p['n_test']} held-out scans): "
                         f"descriptors + logistic {p['descriptors_logistic']:.2f}, FC + logistic {p['fc_logistic']:.2f}, chance 0.50")
    return lines
