"""The science job: does the model learn, and what carries the signal?

``fmrilm run jobs/science.yaml`` (or ``fmrilm bench science``) runs the real stages on Ray
(ingest -> features -> tokenizer -> tokenize -> pretrain -> instruct -> kshot -> eval) on a synthetic
cohort large enough for tight confidence intervals, once per LM *variant*: the variants share
the data, features, tokenizer and tokens (the quickstart chain with a run-name ``tag`` per
variant, :mod:`fmrilm.quickstart`) and differ in what reaches the LM:

* ``scan_token`` (the headline): codes plus the scan-level token from the encoder features;
* ``codes_only``: the codes alone;
* ``encoder_features``: the encoder features through a projector at every fMRI position;
* ``descriptions``: the codes plus each scan's description (a caption) as prompt text, its own
  paradigm, never the headline.

``jobs/science.yaml`` adds variants run apart with ``select``: a pretrained SmolLM2, and ``tokens``
(the whole scan as connectivity-state codes, no scan vector) with its ablations without
pretraining and without the text objectives. A variant that overrides a shared stage (the
tokenizer) runs it, and the stages reading it, under its own name (:func:`own_runs`).

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

import numpy as np
from pydantic import Field

from fmrilm.config import Strict
from fmrilm.data.splits import SplitPolicy
from fmrilm.data.synth import SynthParams
from fmrilm.eval.classical import BEST
from fmrilm.eval.report import SHUFFLED, SHUFFLES_READ, gap_text

log = logging.getLogger("fmrilm.science")
VARIANTS = {
    "scan_token": {"eval": ["shuffles=[time, rois]"]},
    "codes_only": {"pretrain": ["scan_token=false"]},
    "encoder_features": {"pretrain": ["scan_token=false", "input_mode=features"]},
    "descriptions": {"pretrain": ["scan_token=false"], "instruct": ["descriptions=true"]},
}


class Targets(Strict):
    """What the headline variant must reach on the held-out subjects; every comparison with a
    baseline is decided on the paired CI's worse end, not on the point."""

    sex_balanced_accuracy: float = 0.85
    sex_gap_to_best: float = Field(0.05, description="at most this far below the best classical reader: the paired 95 % CI's "
                                   "lower end of (fmrilm - best classical) >= -this")
    age_mae_ratio: float = Field(1.15, description="age MAE at most this multiple of the best classical reader's: the paired "
                                 "95 % CI's upper end of (fmrilm - best classical) MAE <= (this - 1) x its MAE")
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
    repeats: int = Field(1, ge=1, description="runs of the headline's LM stages (pretrain, instruct, kshot, eval) with seeds of "
                         "initialisation and data order 0..repeats-1 on the same split and tokenizer; the report gives each "
                         "headline figure's mean and spread")
    dynamics: SynthParams | None = Field(
        SynthParams(subjects=400, dynamic_effects=["timescale", "lag", "dwell", "bursts"], seed=2),
        description="a second cohort whose diagnosis (Case/Control) is carried only by dynamics static FC cannot see "
        "(sex and age stay in FC); the headline variant runs on it too, asked the diagnosis as well (null: skipped)")
    fresh_seed: int | None = Field(None, description="a seed of the main cohort nothing was tuned on: the headline runs on it too, "
                                   "its targets beside the spec cohort's (`fmrilm bench science` uses synth.seed + 1000 when unset)")
    dynamics_overrides: dict[str, list[str]] = Field(
        {"instruct": ["instructions.tasks={diagnosis: 1.0, sex: 1.0, age: 1.0}"], "eval": ["tasks=[diagnosis, sex, age]", "paradigms=[full]"]},
        description="stage -> key=value for the dynamics cohort, on top of `overrides`")
    name: str = Field("science", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="report folder: <storage>/<name>/")
    ablation_eval: list[str] = Field(["eval.paradigms=[full]"], description="eval overrides of the non-headline variants")
    targets: Targets = Targets()


def variant_overrides(spec: ScienceSpec, name: str, repeat: int = 0, dynamics: bool = False) -> dict[str, list[str]]:
    """Per-stage overrides of one variant: the shared ones, the dynamics cohort's (``dynamics``),
    for the ablations :attr:`ScienceSpec.ablation_eval`, then the variant's own; a repeat
    ``r > 0`` seeds the LM stages' initialisation and data order with ``r``."""
    out = {stage: list(v) for stage, v in spec.overrides.items()}
    for stage, extra in (spec.dynamics_overrides.items() if dynamics else ()):
        out.setdefault(stage, []).extend(extra)
    if name != spec.headline:
        for item in spec.ablation_eval:
            stage, _, kv = item.partition(".")
            out.setdefault(stage, []).append(kv)
    for stage, extra in spec.variants[name].items():
        out.setdefault(stage, []).extend(extra)
    if repeat:
        for stage in ("pretrain", "instruct"):
            out.setdefault(stage, []).append(f"train.seed={repeat}")
        out.setdefault("kshot", []).append(f"seeds=[{repeat}]")
    return out


def cohorts(spec: ScienceSpec) -> dict[str, tuple[SynthParams, str]]:
    """``name -> (generator parameters, storage root)``: ``main`` (the spec's cohort), ``fresh``
    (the same generator on ``fresh_seed``) and ``dynamics``, each where the spec asks for it."""
    from fmrilm import storage

    out = {"main": (spec.synth, spec.storage)}
    if spec.fresh_seed is not None:
        out["fresh"] = (spec.synth.model_copy(update={"seed": spec.fresh_seed}), storage.join(spec.storage, "fresh-seed"))
    if spec.dynamics is not None:
        out["dynamics"] = (spec.dynamics, storage.join(spec.storage, "dynamics"))
    return out


def plan(spec: ScienceSpec) -> list[dict]:
    """The chains to run, in order: ``{"cohort", "variant", "repeat", "tag", "own"}``; every selected
    variant once on the main cohort (headline first), the headline's repeats, then the headline
    on the fresh seed and on the dynamics cohort (and their repeats)."""
    out = []
    for cohort in cohorts(spec):
        for name in selected(spec) if cohort == "main" else [spec.headline]:
            for r in range(spec.repeats if name == spec.headline else 1):
                out.append({"cohort": cohort, "variant": name, "repeat": r, "tag": f"-{name}" + (f"-r{r}" if r else ""),
                            "own": own_runs(spec, name)})
    return out


def own_runs(spec: ScienceSpec, name: str) -> dict[str, str]:
    """The shared stages variant ``name`` runs its own way (it overrides a shared stage such as the
    tokenizer: that stage and those reading it, :func:`fmrilm.registry.own_stages`) -> the suffix
    of their run names: the first variant's name with the same overrides of those stages, so
    that variants differing only in their LM stages share one tokenizer."""
    from fmrilm.registry import own_stages

    own = own_stages(set(spec.variants[name]))
    if not own:
        return {}
    mine = {s: spec.variants[name].get(s) for s in own}
    owner = next(v for v, stages in spec.variants.items() if {s: stages.get(s) for s in own} == mine)
    return {s: f"-{owner}" for s in sorted(own)}


def check(spec: ScienceSpec) -> None:
    from fmrilm.config import ConfigError

    unknown = sorted(set(spec.select or []) - set(spec.variants))
    if unknown:
        raise ConfigError(f"science: select names unknown variant(s) {unknown}; variants are {sorted(spec.variants)}")
    from fmrilm.registry import JOBS

    for name, stages in spec.variants.items():
        # a stage writing no run of its own and reading none (features) writes into the dataset folders
        in_place = sorted(s for s in stages if s in JOBS and not JOBS[s].writes_run and not JOBS[s].inputs)
        if in_place:
            raise ConfigError(f"science: variant {name!r} overrides {in_place}, whose output every variant reads in place (the "
                              f"dataset folders): set those under overrides, for every variant")
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
    chains, where = plan(spec), cohorts(spec)
    for i, c in enumerate(chains):
        log.info("science chain %d/%d: %s cohort, %s, repeat %d", i + 1, len(chains), c["cohort"], c["variant"], c["repeat"])
        params, root = where[c["cohort"]]
        out = run_chain(QuickstartSpec(storage=root, synth=params, split=spec.split, neurolib=[], stages=list(STAGES),
                                       overrides=variant_overrides(spec, c["variant"], c["repeat"], c["cohort"] == "dynamics"),
                                       tag=c["tag"], own=c["own"]))
        c |= {"report": out["report"], "stages": out["stages"]}
    report = summarise(spec, chains)
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

    def versus(task, base):  # the paired gap of the full paradigm to a baseline, as a measured value
        found = _find(res, group, task, "full")
        g = (found[0].get("vs") or {}).get(base) if found else None
        return None if g is None else {"value": g["gap"], "ci": list(g["ci"]), "n": g["n"], "failures": [],
                                       "mcnemar_p": g.get("mcnemar_p"), "reader": g.get("reader")}

    def named(task, key):  # "best classical: <reader> <value>"
        best = _find(res, group, task, "baseline", BEST)
        return f"best classical: {best[0]['reader']} {best[0]['metrics'][key]:.3f}" if best and key in best[0]["metrics"] else ""

    sex = one("sex", "full", "balanced_accuracy")
    add("sex balanced accuracy (full)", sex, f">= {t.sex_balanced_accuracy}", sex and sex["value"] >= t.sex_balanced_accuracy and not sex["failures"])
    gap = versus("sex", BEST)
    add("fmrilm minus best classical, sex (paired)", gap, f"CI lower end >= -{t.sex_gap_to_best}", gap and gap["ci"][0] >= -t.sex_gap_to_best,
        named("sex", "balanced_accuracy") + (f"; McNemar p {gap['mcnemar_p']:.2g}" if gap and gap["mcnemar_p"] is not None else ""))
    fc_gap = versus("sex", "fc_linear")
    add("fmrilm minus FC + logistic, sex (paired)", fc_gap, "reported", True,
        f"McNemar p {fc_gap['mcnemar_p']:.2g}" if fc_gap and fc_gap["mcnemar_p"] is not None else "")
    add("sex AUC (full)", one("sex", "full", "auc"), "reported", True)
    best_mae = one("age", "baseline", "mae", BEST)
    age_gap = versus("age", BEST)
    room = (t.age_mae_ratio - 1) * best_mae["value"] if best_mae else None
    add("fmrilm minus best classical, age MAE (paired)", age_gap,
        f"CI upper end <= ({t.age_mae_ratio} - 1) x best classical" + (f" = {room:.2f}" if room is not None else ""),
        age_gap and room is not None and age_gap["ci"][1] <= room, named("age", "mae"))
    add("age MAE (full)", one("age", "full", "mae"), "reported", True)
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
    """One row per variant: sex balanced accuracy and AUC, age MAE and r (full paradigm), FC +
    logistic's sex balanced accuracy on the time points the variant's prompts show, and the sex
    balanced accuracy of the zero-shot and in-context paradigms where it ran them; a row per
    shuffle of a variant's codes at test time, with the paired difference of its sex balanced
    accuracy from the unshuffled answers (``shuffle_gap``); the baselines of the same test
    subjects as rows of their own (from the first report)."""
    rows = []
    for name, rep in reports.items():
        res = rep["results"]
        shuffled = sorted({r["paradigm"] for r in res if r["paradigm"].startswith(SHUFFLED) and r["group"] == group})
        for paradigm in ["full", *shuffled]:
            pick = {key: _value(next(iter(_find(res, group, task, paradigm)), None), key)
                    for task, key in (("sex", "balanced_accuracy"), ("sex", "auc"), ("age", "mae"), ("age", "pearson_r"))}
            if paradigm == "full":  # FC + logistic on the time points this variant's prompts show (the whole scan with the scan token)
                pick["fc_same_points"] = _value(next(iter(_find(res, group, "sex", "baseline", "fc_linear")), None), "balanced_accuracy")
                for other in ("zero_shot", "in_context"):  # the pretrained export asked directly, and with examples in its prompt
                    pick[other] = _value(next(iter(_find(res, group, "sex", other)), None), "balanced_accuracy")
                rows.append({"variant": name, **pick})
            else:
                gap = (next(iter(_find(res, group, "sex", paradigm)), None) or {}).get("vs", {}).get("full")
                rows.append({"variant": f"{name}, codes shuffled over {paradigm[len(SHUFFLED):]}", **pick, "shuffle_gap": gap})
    first = next(iter(reports.values()))["results"]
    for method in ("majority", "fc_linear", "fc_linear_whole_scan", "descriptors_linear", "prewhitened_fc_linear", "prewhitened_fc_roi_linear", BEST):
        pick = {}
        for task, key, m in (("sex", "balanced_accuracy", method), ("sex", "auc", method), ("age", "mae", "mean" if method == "majority" else method),
                             ("age", "pearson_r", method)):
            pick[key] = _value(next(iter(_find(first, group, task, "baseline", m)), None), key)
        rows.append({"variant": f"baseline: {method}", **pick})
    return rows


PROBED = {"tokenizer: codes: histogram": "codes (histogram)", "tokenizer: codes: decoded FC": "FC rebuilt from the codes",
          "tokenizer: scan vector (encoder features)": "scan vector alone", "LM answer state: pretrained": "pretrained LM's answer state",
          "LM answer state: instruct": "tuned LM's answer state", "fc (whole scan)": "FC (whole scan)"}


def probe_rows(reports: dict[str, dict], group: str = "heldout_subjects") -> list[dict]:
    """Per variant, what a cross-validated linear probe reads of each representation the chain
    passes a scan through (:data:`PROBED`, from each evaluation's probes): sex balanced accuracy
    and age r, ``None`` where it was not probed."""
    rows = []
    for name, rep in reports.items():
        found = {(p["representation"], p["task"]): p["metrics"] for p in rep.get("probes", []) if p["group"] == group}
        rows.append({"variant": name, **{label: {"sex": found.get((rep_name, "sex"), {}).get("balanced_accuracy"),
                                                 "age": found.get((rep_name, "age"), {}).get("pearson_r")}
                                         for rep_name, label in PROBED.items()}})
    return rows


def headline_rows(report: dict, group: str = "heldout_subjects") -> list[dict]:
    """Per task of an evaluation report: the full paradigm, majority / mean, FC + linear, the best
    classical reader, and the paired gap to it (with McNemar's p for classes)."""
    rows = []
    res = report["results"]
    for task in dict.fromkeys(r["task"] for r in res if r["group"] == group):
        key = "mae" if task == "age" else "balanced_accuracy"
        full = next(iter(_find(res, group, task, "full")), None)
        best = next(iter(_find(res, group, task, "baseline", BEST)), None)
        rows.append({"task": task, "metric": key, "fmrilm": _value(full, key),
                     "chance": _value(next(iter(_find(res, group, task, "baseline", "mean" if task == "age" else "majority")), None), key),
                     "fc_linear": _value(next(iter(_find(res, group, task, "baseline", "fc_linear")), None), key),
                     "best": _value(best, key), "reader": best["reader"] if best else None,
                     "gap": ((full or {}).get("vs") or {}).get(BEST)})
    return rows


def spread(reports: list[dict], group: str = "heldout_subjects") -> list[dict]:
    """Mean, standard deviation and range over repeats of the full paradigm's headline figures
    (sex balanced accuracy and AUC, age MAE and r)."""
    rows = []
    for task, key in (("sex", "balanced_accuracy"), ("sex", "auc"), ("age", "mae"), ("age", "pearson_r"), ("diagnosis", "balanced_accuracy")):
        vals = [v["value"] for v in (_value(next(iter(_find(r["results"], group, task, "full")), None), key) for r in reports) if v]
        if vals:
            rows.append({"task": task, "metric": key, "repeats": len(vals), "mean": float(np.mean(vals)),
                         "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, "min": float(min(vals)), "max": float(max(vals))})
    return rows


def summarise(spec: ScienceSpec, chains: list[dict]) -> dict:
    """``science.json``'s content from every chain's evaluation report and stage table
    (:func:`plan`'s entries with ``report`` and ``stages``)."""
    main = [c for c in chains if c["cohort"] == "main"]
    head = next(c for c in main if c["variant"] == spec.headline and c["repeat"] == 0)["report"]
    first = {c["variant"]: c["report"] for c in main if c["repeat"] == 0}
    dyn = [c for c in chains if c["cohort"] == "dynamics"]
    name = lambda c: f"{c['variant']}" + (f" (repeat {c['repeat']})" if c["repeat"] else "") + (f" [{c['cohort']}]" if c["cohort"] != "main" else "")  # noqa: E731
    out = {"spec": spec.model_dump(mode="json"), "groups": head["groups"], "headline": spec.headline,
           "targets": targets(head, spec.targets), "ablation": ablation(first), "probes": probe_rows(first),
           "headline_rows": headline_rows(head),
           "spread": spread([c["report"] for c in main if c["variant"] == spec.headline]),
           "reports": {name(c): c["report"]["files"]["report.md"] for c in chains},
           "stages": {name(c): [{k: s[k] for k in ("stage", "status", "seconds")} for s in c["stages"]] for c in chains}}
    if dyn:
        out["dynamics"] = {"groups": dyn[0]["report"]["groups"], "rows": headline_rows(dyn[0]["report"]),
                           "spread": spread([c["report"] for c in dyn])}
    fresh = [c for c in chains if c["cohort"] == "fresh"]
    if fresh:
        out["fresh"] = {"seed": spec.fresh_seed, "groups": fresh[0]["report"]["groups"], "targets": targets(fresh[0]["report"], spec.targets),
                        "rows": headline_rows(fresh[0]["report"]), "spread": spread([c["report"] for c in fresh])}
    return out


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
    def target_table(rows: list[dict]) -> list[str]:
        out = ["| target | measured | bar | met |", "|---|---|---|---|"]
        for t in rows:
            digits = 0 if "parse" in t["target"] else 3
            value = "-" if t["measured"] is None else (f"{t['measured']['value']:.0%}" if digits == 0 else _cell(t["measured"]))
            out.append(f"| {t['target']} | {value}{' (' + t['note'] + ')' if t['note'] else ''} | {t['bar']} | {'yes' if t['met'] else 'NO'} |")
        return out

    lines = ["# fmrilm science job", "",
             f"Synthetic cohort: {g.get('train', 0)} training scans, {g.get('heldout_subjects', 0)} held-out test scans "
             "(subjects never seen by any stage). 95 % bootstrap CIs over test scans (within each class) in brackets. "
             f"Headline variant: `{report['headline']}`. Settings were fixed before the run; nothing is tuned on the test subjects.", "",
             "## Targets", ""] + target_table(report["targets"])
    lines += ["", "## fmrilm beside the best classical reader (full paradigm, held-out subjects)", ""]
    lines += _headline_table(report.get("headline_rows", []))
    if report.get("spread") and max(r["repeats"] for r in report["spread"]) > 1:
        lines += ["", "## Run-to-run spread of the headline (seeds of initialisation and data order, the same split)", ""]
        lines += _spread_table(report["spread"])
    if report.get("fresh"):
        f = report["fresh"]
        lines += ["", f"## Confirmation on a fresh seed ({f['seed']})", "",
                  f"The same generator and recipe on a cohort drawn with seed {f['seed']}, which nothing was tuned on "
                  f"({f['groups'].get('train', 0)} training, {f['groups'].get('heldout_subjects', 0)} test scans):", ""]
        lines += _headline_table(f["rows"]) + [""] + target_table(f["targets"])
    if report.get("dynamics"):
        d = report["dynamics"]
        lines += ["", "## The dynamics cohort", "",
                  f"A second synthetic cohort ({d['groups'].get('train', 0)} training, {d['groups'].get('heldout_subjects', 0)} test scans) "
                  "whose diagnosis (Case / Control) is carried only by dynamics static FC cannot see (ROI timescale, lag direction, "
                  "state dwell, amplitude bursts; `fmrilm.data.synth`), sex and age in FC as in the main cohort. The headline "
                  "variant, trained and scored on it:", ""]
        lines += _headline_table(d["rows"])
        if d.get("spread") and max(r["repeats"] for r in d["spread"]) > 1:
            lines += [""] + _spread_table(d["spread"])
    lines += ["", "## What carries the signal (full paradigm, held-out subjects)", "",
              "| variant | sex balanced accuracy | sex AUC | age MAE (y) | age r | sex: FC + logistic on the prompt's time points "
              "| sex: shuffled minus unshuffled (paired) | sex zero-shot | sex in-context |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["ablation"]:
        lines.append(f"| {r['variant']} | {_cell(r['balanced_accuracy'])} | {_cell(r['auc'])} | {_cell(r['mae'], 2)} | {_cell(r['pearson_r'])} "
                     f"| {_cell(r.get('fc_same_points'))} | {gap_text(r['shuffle_gap']) if r.get('shuffle_gap') else '-'} "
                     f"| {_cell(r.get('zero_shot'))} | {_cell(r.get('in_context'))} |")
    if any("shuffle_gap" in r for r in report["ablation"]):
        lines += ["", f"Codes shuffled at test time: {SHUFFLES_READ}"]
    if report.get("probes"):
        lines += ["", "## What a linear probe reads of each representation (held-out subjects; sex balanced accuracy / age r)", "",
                  "Cross-validated on the test scans alone: where the signal is lost along the chain, not the model's answers.", "",
                  "| variant | " + " | ".join(PROBED.values()) + " |", "|---|" + "---|" * len(PROBED)]
        for r in report["probes"]:
            lines.append(f"| {r['variant']} | " + " | ".join(_probe_cell(r[label]) for label in PROBED.values()) + " |")
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


def _probe_cell(v: dict) -> str:
    if v["sex"] is None and v["age"] is None:
        return "-"
    return " / ".join("-" if x is None else f"{x:.3f}" for x in (v["sex"], v["age"]))


def _headline_table(rows: list[dict]) -> list[str]:
    lines = ["| task | metric | fmrilm | majority / mean | FC + linear | best classical | fmrilm - best classical [95 % CI] |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r["gap"]
        gap = "-" if not g else (f"{g['gap']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]"
                                 + (f", McNemar p {g['mcnemar_p']:.2g}" if g.get("mcnemar_p") is not None else ""))
        digits = 2 if r["metric"] == "mae" else 3
        lines.append(f"| {r['task']} | {r['metric']} | {_cell(r['fmrilm'], digits)} | {_cell(r['chance'], digits)} | "
                     f"{_cell(r['fc_linear'], digits)} | {_cell(r['best'], digits)} ({r['reader'] or '-'}) | {gap} |")
    return lines


def _spread_table(rows: list[dict]) -> list[str]:
    lines = ["| task | metric | repeats | mean +/- sd | range |", "|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['metric']} | {r['repeats']} | {r['mean']:.3f} +/- {r['sd']:.3f} | {r['min']:.3f}-{r['max']:.3f} |"
              for r in rows]
    return lines


def _stage_names(report: dict) -> list[str]:
    return list(dict.fromkeys(s["stage"] for st in report["stages"].values() for s in st))


def met(report: dict) -> bool:
    """Whether every target of a science report is met, on the fresh seed too when it ran."""
    return all(t["met"] for t in report["targets"] + (report.get("fresh") or {}).get("targets", []))


def summary(report: dict) -> list[str]:
    """Lines a person reads after :func:`run`; the first is the headline (where the report went)."""
    return [f"science report: {report['files']['science.md']}", "", *markdown(report).splitlines()]
