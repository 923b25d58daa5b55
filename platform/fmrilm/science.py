"""The science job: does the model learn, and what carries the signal?

``fmrilm run jobs/science.yaml`` (or ``fmrilm bench science``) runs the real stages on Ray
(ingest -> features -> tokenizer -> tokenize -> pretrain -> instruct -> eval) on a synthetic
cohort large enough for tight confidence intervals, once per LM *variant*: the variants share
the data, features, tokenizer and tokens (the quickstart chain with a run-name ``tag`` per
variant, :mod:`fmrilm.quickstart`) and differ in what reaches the LM:

* ``scan_token`` (the headline): codes plus the scan-level token from the encoder features;
* ``codes_only``: the codes alone;
* ``encoder_features``: the encoder features through a projector at every fMRI position;
* ``descriptions``: the codes plus each scan's description (a caption) as prompt text, its own
  paradigm, never the headline.

Every variant is evaluated on the same held-out test subjects beside majority and FC + linear
(on the time points the prompt shows, and the whole scan). Nothing is tuned on them: the
settings are fixed in the spec before the run. Writes ``science.json`` and ``science.md``
(targets with their CIs and whether each is met, the ablation table, and each variant's own
evaluation report) under ``<storage>/<name>/``. ``select`` runs some of the variants (a costly one,
such as a pretrained backbone, apart from the rest, on the same shared chain and test subjects).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Literal

from pydantic import Field

from fmrilm.config import Strict
from fmrilm.data.splits import SplitPolicy
from fmrilm.data.synth import SynthParams

log = logging.getLogger("fmrilm.science")
SHARED = ("ingest", "features", "tokenizer", "tokenize")
VARIANTS = {
    "scan_token": {},
    "codes_only": {"pretrain": ["scan_token=false"]},
    "encoder_features": {"pretrain": ["scan_token=false", "input_mode=features"]},
    "descriptions": {"pretrain": ["scan_token=false"], "instruct": ["descriptions=true"]},
}


class Targets(Strict):
    """What the headline variant must reach on the held-out subjects."""

    sex_balanced_accuracy: float = 0.85
    sex_gap_to_fc: float = Field(0.05, description="at most this far below FC + logistic on the same time points")
    age_mae_ratio: float = Field(1.15, description="age MAE at most this multiple of FC + ridge's")
    age_pearson_r: float = 0.5
    age_parse_rate: float = 0.95
    kshot_k: int = Field(8, description="the k-shot LoRA result whose CI must clear majority")


class ScienceSpec(Strict):
    """Spec of ``jobs/science.yaml``."""

    kind: Literal["science"] = "science"
    storage: str = Field("./fmrilm-data/science", description="root URI of the cohort, runs and report")
    synth: SynthParams = SynthParams(subjects=640)
    split: SplitPolicy = SplitPolicy(fractions={"train": 0.7, "val": 0.05, "test": 0.25})
    overrides: dict[str, list[str]] = Field({}, description="stage -> key=value for every variant")
    variants: dict[str, dict[str, list[str]]] = Field(VARIANTS, description="variant -> stage -> key=value on top of `overrides`")
    select: list[str] | None = Field(None, description="the variants to run (default: every one); the headline must be among them")
    headline: str = "scan_token"
    name: str = Field("science", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="report folder: <storage>/<name>/")
    ablation_eval: list[str] = Field(["eval.paradigms=[full]"], description="eval overrides of the non-headline variants")
    targets: Targets = Targets()


def variant_overrides(spec: ScienceSpec, name: str) -> dict[str, list[str]]:
    """Per-stage overrides of one variant: the shared ones, then the variant's (and, for the
    ablations, :attr:`ScienceSpec.ablation_eval`)."""
    out = {stage: list(v) for stage, v in spec.overrides.items()}
    for stage, extra in spec.variants[name].items():
        out.setdefault(stage, []).extend(extra)
    if name != spec.headline:
        for item in spec.ablation_eval:
            stage, _, kv = item.partition(".")
            out.setdefault(stage, []).append(kv)
    return out


def check(spec: ScienceSpec) -> None:
    from fmrilm.config import ConfigError

    unknown = sorted(set(spec.select or []) - set(spec.variants))
    if unknown:
        raise ConfigError(f"science: select names unknown variant(s) {unknown}; variants are {sorted(spec.variants)}")
    if spec.headline not in selected(spec):
        raise ConfigError(f"science: headline {spec.headline!r} is not one of the variants to run {selected(spec)}")


def selected(spec: ScienceSpec) -> list[str]:
    """The variants to run, headline first."""
    names = [v for v in spec.variants if spec.select is None or v in spec.select]
    return sorted(names, key=lambda v: v != spec.headline)


def run(spec: ScienceSpec) -> dict:
    """Run every variant's chain (the shared stages once) and write the science report; returns it."""
    from fmrilm import storage
    from fmrilm.quickstart import STAGES, QuickstartSpec
    from fmrilm.quickstart import run as run_chain

    check(spec)
    start = time.perf_counter()
    order = selected(spec)
    chains = {}
    for i, name in enumerate(order):
        log.info("science variant %d/%d: %s", i + 1, len(order), name)
        chains[name] = run_chain(QuickstartSpec(storage=spec.storage, synth=spec.synth, split=spec.split, neurolib=[],
                                                stages=list(STAGES), overrides=variant_overrides(spec, name), tag=f"-{name}"))
    report = summarise(spec, {n: c["report"] for n, c in chains.items()}, {n: c["stages"] for n, c in chains.items()})
    report["seconds"] = time.perf_counter() - start
    where = storage.resolve(storage.join(spec.storage, spec.name))
    storage.write_text(where.join("science.json"), json.dumps(report, indent=1, default=float))
    storage.write_text(where.join("science.md"), markdown(report))
    report["files"] = {"science.md": where.join("science.md").uri, "science.json": where.join("science.json").uri}
    return report


# ---------------------------------------------------------------- the report (pure)


def _find(results: list[dict], group: str, task: str, paradigm: str, method: str = "fmrilm", k=None) -> list[dict]:
    return [r for r in results if r["group"] == group and r["task"] == task and r["paradigm"] == paradigm and r["method"] == method
            and (k is None or r.get("k") == k)]


def _value(res: dict | None, key: str) -> dict | None:
    if not res or key not in res["metrics"]:
        return None
    ci = res.get("ci", {}).get(key)
    return {"value": float(res["metrics"][key]), "ci": [float(c) for c in ci] if ci else None, "n": res["n"],
            "failures": res.get("failures", [])}


def targets(report: dict, t: Targets, group: str = "heldout_subjects") -> list[dict]:
    """The headline evaluation report checked against ``t``: one row per target with the
    measured value (and CI), the bar it must clear and whether it does; a missing result is a
    row that is not met."""
    res = report["results"]

    def one(task, paradigm, key, method="fmrilm", k=None):
        found = _find(res, group, task, paradigm, method, k)
        return _value(found[0] if found else None, key)

    rows = []

    def add(name, value, bar, met, note=""):
        rows.append({"target": name, "measured": value, "bar": bar, "met": bool(met) if value is not None else False, "note": note})

    sex = one("sex", "full", "balanced_accuracy")
    fc = one("sex", "baseline", "balanced_accuracy", "fc_linear")
    add("sex balanced accuracy (full)", sex, f">= {t.sex_balanced_accuracy}", sex and sex["value"] >= t.sex_balanced_accuracy and not sex["failures"])
    gap = None if not (sex and fc) else {"value": fc["value"] - sex["value"], "ci": None, "n": sex["n"], "failures": []}
    add("FC + logistic minus fmrilm (same time points)", gap, f"<= {t.sex_gap_to_fc}", gap and gap["value"] <= t.sex_gap_to_fc,
        f"FC + logistic {fc['value']:.3f}" if fc else "")
    add("sex AUC (full)", one("sex", "full", "auc"), "reported", True)
    mae, ridge = one("age", "full", "mae"), one("age", "baseline", "mae", "fc_linear")
    add("age MAE (full)", mae, f"<= {t.age_mae_ratio} x FC + ridge" + (f" = {t.age_mae_ratio * ridge['value']:.2f}" if ridge else ""),
        mae and ridge and mae["value"] <= t.age_mae_ratio * ridge["value"], f"FC + ridge {ridge['value']:.2f}" if ridge else "")
    r = one("age", "full", "pearson_r")
    add("age Pearson r (full)", r, f">= {t.age_pearson_r}", r and r["value"] >= t.age_pearson_r)
    parsed = _find(res, group, "age", "full")
    rate = {"value": parsed[0]["parse_rate"], "ci": None, "n": parsed[0]["n"], "failures": []} if parsed and "parse_rate" in parsed[0] else None
    add("age answers that parse as numbers (full)", rate, f">= {t.age_parse_rate:.0%}", rate and rate["value"] >= t.age_parse_rate)
    shots = _find(res, group, "sex", "kshot_lora", k=t.kshot_k)
    worst = min(shots, key=lambda s: (s.get("ci") or {}).get("balanced_accuracy", [0])[0], default=None)
    kv = _value(worst, "balanced_accuracy")
    same_seed = [r for r in _find(res, group, "sex", "kshot_lora", "fc_linear", t.kshot_k) if worst and r.get("seed") == worst.get("seed")]
    few_fc = _value(next(iter(same_seed), None), "balanced_accuracy")  # FC + logistic on the worst seed's own k scans
    add(f"sex k-shot LoRA k={t.kshot_k} (worst seed)", kv, "CI lower bound > 0.5 (majority)", kv and kv["ci"] and kv["ci"][0] > 0.5,
        f"FC + logistic on the same {2 * t.kshot_k} scans {few_fc['value']:.3f}" if few_fc else "")
    ic = one("sex", "in_context", "balanced_accuracy")
    add("sex in-context", ic, "reported", True)
    return rows


def ablation(reports: dict[str, dict], group: str = "heldout_subjects") -> list[dict]:
    """One row per variant: sex balanced accuracy and AUC, age MAE and r (full paradigm), with
    the baselines of the same test subjects as rows of their own (from the first report)."""
    rows = []
    for name, rep in reports.items():
        res = rep["results"]
        pick = {key: _value(next(iter(_find(res, group, task, "full")), None), key)
                for task, key in (("sex", "balanced_accuracy"), ("sex", "auc"), ("age", "mae"), ("age", "pearson_r"))}
        rows.append({"variant": name, **pick})
    first = next(iter(reports.values()))["results"]
    for method in ("majority", "fc_linear", "fc_linear_whole_scan", "descriptors_linear"):
        pick = {}
        for task, key, m in (("sex", "balanced_accuracy", method), ("sex", "auc", method), ("age", "mae", "mean" if method == "majority" else method),
                             ("age", "pearson_r", method)):
            pick[key] = _value(next(iter(_find(first, group, task, "baseline", m)), None), key)
        rows.append({"variant": f"baseline: {method}", **pick})
    return rows


def summarise(spec: ScienceSpec, reports: dict[str, dict], stages: dict[str, list[dict]]) -> dict:
    """``science.json``'s content from each variant's evaluation report and stage table."""
    head = reports[spec.headline]
    return {"spec": spec.model_dump(mode="json"), "groups": head["groups"], "headline": spec.headline,
            "targets": targets(head, spec.targets), "ablation": ablation(reports),
            "reports": {n: r["files"]["report.md"] for n, r in reports.items()},
            "stages": {n: [{k: s[k] for k in ("stage", "status", "seconds")} for s in st] for n, st in stages.items()}}


def _cell(v: dict | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    text = f"{v['value']:.{digits}f}"
    if v.get("ci"):
        text += f" [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]"
    if v.get("failures"):
        text += " FAILED: " + ", ".join(v["failures"])
    return text


def markdown(report: dict) -> str:
    """``science.md``: targets, ablation, time per stage, links to each variant's report."""
    g = report["groups"]
    lines = ["# fmrilm science job", "",
             f"Synthetic cohort: {g.get('train', 0)} training scans, {g.get('heldout_subjects', 0)} held-out test scans "
             "(subjects never seen by any stage). 95 % bootstrap CIs over test scans (within each class) in brackets. "
             f"Headline variant: `{report['headline']}`. Settings were fixed before the run; nothing is tuned on the test subjects.", "",
             "## Targets", "", "| target | measured | bar | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        digits = 0 if "parse" in t["target"] else 3
        value = "-" if t["measured"] is None else (f"{t['measured']['value']:.0%}" if digits == 0 else _cell(t["measured"]))
        lines.append(f"| {t['target']} | {value}{' (' + t['note'] + ')' if t['note'] else ''} | {t['bar']} | {'yes' if t['met'] else 'NO'} |")
    lines += ["", "## What carries the signal (full paradigm, held-out subjects)", "",
              "| variant | sex balanced accuracy | sex AUC | age MAE (y) | age r |", "|---|---|---|---|---|"]
    for r in report["ablation"]:
        lines.append(f"| {r['variant']} | {_cell(r['balanced_accuracy'])} | {_cell(r['auc'])} | {_cell(r['mae'], 2)} | {_cell(r['pearson_r'])} |")
    lines += ["", "## Time per stage (s)", "", "| variant | " + " | ".join(_stage_names(report)) + " |",
              "|---|" + "---|" * len(_stage_names(report))]
    for name, st in report["stages"].items():
        by = {s["stage"]: s for s in st}
        lines.append(f"| {name} | " + " | ".join(f"{by[s]['seconds']:.0f}" + (" (reused)" if by[s]["status"] == "reused" else "")
                                                 if s in by else "-" for s in _stage_names(report)) + " |")
    if "seconds" in report:
        lines += ["", f"Whole job: {report['seconds'] / 60:.1f} min."]
    lines += ["", "## Each variant's evaluation report", ""] + [f"- {n}: `{u}`" for n, u in report["reports"].items()]
    return "\n".join(lines) + "\n"


def _stage_names(report: dict) -> list[str]:
    return list(dict.fromkeys(s["stage"] for st in report["stages"].values() for s in st))


def met(report: dict) -> bool:
    """Whether every target of a science report is met."""
    return all(t["met"] for t in report["targets"])

