"""Dataset summaries for ``fmrilm data inspect``: counts, splits, phenotype coverage."""

from __future__ import annotations

import pandas as pd

from fmrilm.data import table
from fmrilm.data.splits import assign

PHENOTYPES = ("age", "sex", "diagnosis")


def summarize(uri: str) -> dict:
    """Summarise every dataset under ``uri``.

    Returns a dict with top-level keys ``rows``, ``subjects``, ``n_rois``, ``datasets``,
    ``atlas``, ``splits``, ``phenotype_coverage`` (plus ``quarantined``). Splits use each
    dataset's own split policy from its manifest.
    """
    found = table.find_datasets(uri)
    frames, per_dataset = [], {}
    for loc, manifest in found:
        meta = table.read_meta(loc, manifest).to_pandas()
        meta["split"] = assign(meta, {manifest["dataset"]: manifest})
        frames.append(meta)
        per_dataset[manifest["dataset"]] = {
            "uri": loc.uri, "rows": int(len(meta)), "subjects": int(meta["subject_id"].nunique()),
            "n_rois": manifest["n_rois"], "atlas": manifest["atlas"], "tr": manifest["tr"],
            "timepoints": manifest.get("timepoints"), "sites": manifest.get("sites"),
            "version": manifest["version"], "shards": len(manifest["shards"]),
            "quarantined": len(manifest.get("quarantined", [])),
        }
    meta = pd.concat(frames, ignore_index=True)
    subject_key = meta["dataset"] + "/" + meta["subject_id"]
    splits = {
        name: {"scans": int((meta["split"] == name).sum()), "subjects": int(subject_key[meta["split"] == name].nunique())}
        for name in sorted(meta["split"].unique())
    }
    return {
        "rows": int(len(meta)),
        "subjects": int(subject_key.nunique()),
        "n_rois": sorted({m["n_rois"] for _, m in found}),
        "datasets": per_dataset,
        "atlas": sorted({m["atlas"] for _, m in found}),
        "splits": splits,
        "phenotype_coverage": {p: round(float(meta[p].notna().mean()), 4) for p in PHENOTYPES},
        "quarantined": sum(len(m.get("quarantined", [])) for _, m in found),
    }


def lines(summary: dict) -> list[str]:
    """:func:`summarize`'s result as Markdown: a table of datasets, one of splits, the phenotype coverage."""
    out = [f"{summary['rows']} scans, {summary['subjects']} subjects", "",
           "| dataset | scans | subjects | ROIs | atlas | TR (s) | timepoints | sites | quarantined |", "|---|---|---|---|---|---|---|---|---|"]
    for name, d in summary["datasets"].items():
        tp = d.get("timepoints") or {}
        sites = ", ".join(f"{k}:{v}" for k, v in (d.get("sites") or {}).items())
        out.append(f"| {name} | {d['rows']} | {d['subjects']} | {d['n_rois']} | {d['atlas']} | {', '.join(map(str, d['tr']))} | "
                   f"{tp.get('min')}-{tp.get('max')} | {sites} | {d['quarantined']} |")
    out += ["", "subject-level splits:", "", "| split | subjects | scans |", "|---|---|---|"]
    out += [f"| {name} | {v['subjects']} | {v['scans']} |" for name, v in summary["splits"].items()]
    return out + ["", "phenotype coverage: " + ", ".join(f"{k} {v:.0%}" for k, v in summary["phenotype_coverage"].items())]
