"""The evaluation report: ``report.json``, ``predictions.json``, ``report.md`` and plots.

One table per test group: rows are task x paradigm of the LM, columns the LM's headline metric
(balanced accuracy for classification, MAE for the age number) with its 95 % bootstrap CI, the best
classical reader and the paired gap to it, and every baseline on the same scans; then a table of
every classical reader per group. k-shot rows show the mean over seeds (and their range), beside
FC + linear fitted on the same k scans per class. Rows ``full_shuffled_time`` / ``_rois`` are the
full paradigm on codes shuffled at test time; a section gives their paired fall from ``full``.
"""

from __future__ import annotations

import json

import numpy as np

from fmrilm import storage
from fmrilm.eval.classical import BEST

SHUFFLED = "full_shuffled_"  # the full paradigm on codes shuffled at test time (fmrilm.eval.run)
VLM = "vlm:"  # the method names of VLM baseline exports: vlm:<family>:<run> (fmrilm.eval.vlm)
ARM = "arm:"  # the method names of other instruct exports asked like the full paradigm: arm:<run> (fmrilm.eval.run)
SHUFFLES_READ = ("over `time`, each ROI's codes permuted over the scan's time steps; over `rois`, each time step's codes permuted "
                 "over ROIs (the scan token's vector is kept). A model that reads its codes falls; one that does not stays where it was.")


def answers(method: str) -> bool:
    """Whether a result's method is a model answering questions (fmrilm, another arm, a VLM), not a baseline."""
    return method == "fmrilm" or method.startswith((ARM, VLM))


HEADLINE = {"classification": "balanced_accuracy", "regression": "mae"}


def headline(task: str) -> str:
    from fmrilm.data.instructions import REGRESSION

    return HEADLINE["regression" if task in REGRESSION else "classification"]


def _fmt(res: dict | None, key: str, ci: bool = True) -> str:
    if not res or key not in res["metrics"]:
        return "-"
    text = f"{res['metrics'][key]:.3f}"
    if ci and key in res.get("ci", {}):
        lo, hi = res["ci"][key]
        text += f" [{lo:.2f}, {hi:.2f}]"
    if res.get("failures"):  # a result that says nothing is marked where it is read
        text += " FAILED: " + ", ".join(res["failures"])
    return text


def _over_seeds(same: list[dict], key: str) -> str:
    """One result with its CI, or the mean over seeds with their range."""
    if len(same) == 1:
        return _fmt(same[0], key)
    vals = [r["metrics"][key] for r in same if key in r["metrics"]]
    return f"{np.mean(vals):.3f} (seeds {min(vals):.2f}-{max(vals):.2f})" if vals else "-"


def table_rows(report: dict, group: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one group's table (see the module docstring)."""
    results = [r for r in report["results"] if r["group"] == group]
    header = ["task", "metric", "paradigm", "fmrilm", "majority/mean", "best classical", "fmrilm - best classical", "fc_linear",
              "fc_linear_whole_scan", "descriptors_linear", "planted_pattern"]
    deconfounded = any(r["method"] == "fc_linear_deconfounded" for r in results)
    header += ["fc_linear_deconfounded"] if deconfounded else []
    rows = []
    for task in dict.fromkeys(r["task"] for r in results):
        key = headline(task)
        base = {r["method"]: r for r in results if r["task"] == task and r["paradigm"] == "baseline"}
        best = base.get(BEST)
        best_cell = _fmt(best, key) + (f" ({best['reader']})" if best else "")
        cols = [_fmt(base.get("majority") or base.get("mean"), key, False), _fmt(base.get("fc_linear"), key),
                _fmt(base.get("fc_linear_whole_scan"), key), _fmt(base.get("descriptors_linear"), key), _fmt(base.get("planted_pattern"), key)]
        cols += [_fmt(base.get("fc_linear_deconfounded"), key)] if deconfounded else []
        lm = [r for r in results if r["task"] == task and r["method"] == "fmrilm"]
        for paradigm in ("zero_shot", "in_context", "kshot_lora", "full", *sorted({r["paradigm"] for r in lm if r["paradigm"].startswith(SHUFFLED)})):
            runs = [r for r in lm if r["paradigm"] == paradigm]
            for k in sorted({r["k"] for r in runs}, key=lambda v: -1 if v is None else v):
                name = paradigm if k is None else f"{paradigm} k={k}"
                same = [r for r in runs if r["k"] == k]
                cells = [cols[0], best_cell, gap_text(same[0].get("vs", {}).get(BEST)) if len(same) == 1 else "-", *cols[1:]]
                if paradigm == "kshot_lora":  # FC + linear fitted on the same k scans per class; no other baseline applies
                    few = [r for r in results if r["task"] == task and r["paradigm"] == paradigm and r["k"] == k and r["method"] == "fc_linear"]
                    cells = [cols[0], "-", "-", _over_seeds(few, key) + " (same k scans)" if few else "-"] + ["-"] * (len(cols) - 2)
                rows.append([task, key, name, _over_seeds(same, key), *cells])
        others = [r for r in results if r["task"] == task and r["method"].startswith((ARM, VLM))]
        for r in others:  # another arm's or a VLM's answer sits in the fmrilm column of its own row
            rows.append([task, key, r["method"], _fmt(r, key), cols[0], best_cell, gap_text(r.get("vs", {}).get(BEST)), *cols[1:]])
        if not lm and not others:
            rows.append([task, key, "(baselines only)", "-", cols[0], best_cell, "-", *cols[1:]])
    return header, rows


def gap_text(gap: dict | None) -> str:
    """A paired gap (:func:`fmrilm.eval.metrics.compare`) as ``+0.012 [-0.03, +0.05], McNemar p 0.4``."""
    if not gap:
        return "-"
    lo, hi = gap["ci"]
    text = f"{gap['gap']:+.3f} [{lo:+.2f}, {hi:+.2f}]"
    return text + (f", McNemar p {gap['mcnemar_p']:.2g}" if "mcnemar_p" in gap else "")


def classical_rows(report: dict, group: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one group's table of the classical readers: a row per reader, a column
    per task and time span (the prompt's time points; the whole scan where it differs), the
    reader chosen as best classical (on the training scans' inner CV) marked with ``*``; a reader
    fitted in no cell (one that did not apply to these scans) has no row."""
    from fmrilm.features.dynamics import READERS

    base = [r for r in report["results"] if r["group"] == group and r["paradigm"] == "baseline"]
    tasks = list(dict.fromkeys(r["task"] for r in base))
    spans = [s for s in ("", "_whole_scan") if any(r["method"] == f"{BEST}{s}" for r in base)]
    if not spans:
        return [], []
    header = ["reader"] + [f"{t} {headline(t)}" + (" (whole scan)" if s else "") for t in tasks for s in spans]
    rows = []
    for reader in READERS:
        cells = []
        for t in tasks:
            for s in spans:
                hit = next((r for r in base if r["task"] == t and r["method"] == f"{reader}_linear{s}"), None)
                chosen = next((r for r in base if r["task"] == t and r["method"] == f"{BEST}{s}"), {}).get("reader") == f"{reader}_linear{s}"
                cells.append(_fmt(hit, headline(t)) + (" *" if chosen else ""))
        if any(r["method"] in {f"{reader}_linear{s}" for s in spans} for r in base):
            rows.append([reader, *cells])
    return header, rows


def vlm_lines(report: dict) -> list[str]:
    """The section on the other arms and the VLM baselines (rows named ``arm:<run>`` and
    ``vlm:<family>:<run>`` in the tables): each one's paired gap to fmrilm's full paradigm, and the
    spread of every method's age predictions."""
    others = [r for r in report["results"] if r["method"].startswith((ARM, VLM))]
    if not others:
        return []
    lines = ["## Other arms: instruct exports and vision-language models", "",
             "Each `arm:<run>` row is another instruct export (another backbone or input mode, e.g. the fMRI encoder + GPT-2 "
             "arm) asked like the full paradigm; each `vlm:<family>:<run>` row a VLM tuned on the training scans rendered as "
             "images (`fmrilm run jobs/baseline_vlm.yaml`); both answer the same questions about the same held-out scans. Their "
             "paired gaps to fmrilm's full paradigm (arm minus fmrilm; for MAE, negative is the arm's win):", ""]
    for r in others:
        lines.append(f"- {r['task']} / {r['group'].replace('_', ' ')} / {r['method']}: {_fmt(r, headline(r['task']))}; vs fmrilm full "
                     f"{gap_text(r.get('vs', {}).get('full'))}")
    ages = [r for r in report["results"] if r["task"] == "age" and "spread" in r["metrics"] and r["method"] not in ("mean",)]
    if ages:
        lines += ["", "Spread of the age predictions (their SD over the true ages' SD; 1: as wide as the truth, near 0: one age "
                  "for everyone, the poster's narrow output range):", "", "| group | paradigm | method | spread | pearson r |", "|---|---|---|---|---|"]
        lines += [f"| {r['group'].replace('_', ' ')} | {r['paradigm']} | {r['method']} | {_fmt(r, 'spread')} | {_fmt(r, 'pearson_r', False)} |"
                  for r in ages if r["k"] is None]
    return lines + [""]


def group_tables(report: dict) -> list[str]:
    """Markdown lines: a titled table (:func:`table_rows`) per held-out group of the report."""
    lines = []
    for group in report["groups"]:
        if group == "train":
            continue
        header, rows = table_rows(report, group)
        lines += [f"## {group.replace('_', ' ')} ({report['groups'][group]} scans)", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    return lines


def shuffle_lines(report: dict) -> list[str]:
    """The section on codes shuffled at test time: per group and task, each shuffle's result and
    its paired difference from the unshuffled full paradigm (none without shuffled rows)."""
    rows = [r for r in report["results"] if r["paradigm"].startswith(SHUFFLED) and r["method"] == "fmrilm"]
    if not rows:
        return []
    lines = ["## Codes shuffled at test time", "",
             f"The full paradigm asked again with each test scan's codes shuffled: {SHUFFLES_READ} Paired difference from the "
             "unshuffled answers on the same scans, 95 % bootstrap CI:", ""]
    for r in rows:
        key = headline(r["task"])
        lines.append(f"- {r['task']} ({r['group'].replace('_', ' ')}), shuffled over {r['paradigm'][len(SHUFFLED):]}: "
                     f"{_fmt(r, key)}; minus unshuffled {gap_text((r.get('vs') or {}).get('full'))}")
    return lines + [""]


def markdown(report: dict) -> str:
    """``report.md``: a table per group, the figures, and how to read them."""
    lines = ["# fmrilm evaluation", "",
             f"Pretrained export: `{report['pretrained']}`; instruct export: `{report['spec']['model']}`.",
             f"Scans: {report['groups']}. Headline metric: balanced accuracy (classification), MAE in years (age).",
             "Baselines are fitted on every training subject (on the same k scans per class in k-shot rows); `fc_linear` sees the same time points as the LM's prompt "
             "(the whole scan when the model has the scan token, which summarises all of it), `fc_linear_whole_scan` the whole scan, `fc_linear_deconfounded` (when shown) `fc_linear` with site and head motion regressed out of every edge on the training scans. 95 % bootstrap CIs over test scans (resampled within each class) in brackets.", ""]
    lines += group_tables(report)
    lines += ["The best classical reader is chosen per task on the training scans' inner cross-validation (never on a test scan); "
              "`fmrilm - best classical` is the paired difference on the same test scans with its 95 % bootstrap CI (a negative "
              "MAE gap is fmrilm's win) and, for classes, McNemar's exact p. A target is met when its CI says so, not its point.", ""]
    lines += shuffle_lines(report) + vlm_lines(report)
    for group in report["groups"]:
        header, rows = classical_rows(report, group)
        if rows:
            lines += [f"## Classical readers ({group.replace('_', ' ')})", "",
                      "Each reader's vector + a linear model with its penalty chosen by inner CV on the training scans "
                      "(`fmrilm.features.dynamics`); `*` marks the best classical.", "",
                      "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    if report.get("by_site"):
        lines += ["## By site", "", "The full paradigm and the baselines scored within each site (same predictions; 95 % bootstrap CIs):", "",
                  "| task | group | method | site | n | metric | value [95 % CI] |", "|---|---|---|---|---|---|---|"]
        for r in report["by_site"]:
            key = "mae" if "mae" in r["metrics"] else "balanced_accuracy"
            lo, hi = (r.get("ci") or {}).get(key, (None, None))
            ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and np.isfinite(lo) else ""
            name = "fmrilm" if r["method"] == "fmrilm" else r["method"]
            lines.append(f"| {r['task']} | {r['group'].replace('_', ' ')} | {name} | {r['site']} | {r['n']} | {key} | "
                         f"{r['metrics'][key]:.3f}{ci} |")
        lines.append("")
    if report.get("input_warnings"):
        lines += ["## Input checks", "", "The tokenizer's input contract let these through (from `fmrilm tokenize`):", ""]
        lines += [f"- {w}" for w in report["input_warnings"]] + [""]
    failed = [r for r in report["results"] if r.get("failures") and r["method"] == "fmrilm"]
    if failed:
        lines += ["## Failures", "", "These fmrilm results carry no information about the scans (FAILED in the tables):", ""]
        lines += [f"- {r['task']} / {r['group']} / {r['paradigm']}" + (f" k={r['k']}" if r.get("k") else "") + f": {', '.join(r['failures'])}"
                  for r in failed]
        lines.append("")
    for group in report["groups"]:
        rates: dict[str, list[float]] = {}
        for r in report["results"]:
            if r["group"] == group and "parse_rate" in r:
                rates.setdefault(r["paradigm"] + ("" if r["k"] is None else f" k={r['k']}"), []).append(r["parse_rate"])
        if rates:
            decoding = {r.get("decoding", "greedy") for r in report["results"] if r["group"] == group and "parse_rate" in r}
            how = ("the age figures above are constrained answers (the mean of the whole ages seen in training under the model's "
                   "probabilities), so parsing does not change them" if decoding == {"expected"}
                   else "unparsed answers count as the training mean")
            lines += [f"Greedily generated age answers that parse as a number ({group.replace('_', ' ')}): "
                      + ", ".join(f"{name} {np.mean(v):.0%}" for name, v in rates.items()) + f" ({how}).", ""]
    probes = report.get("probes") or []
    for group in dict.fromkeys(r["group"] for r in probes):
        rows = [r for r in probes if r["group"] == group]
        tasks = list(dict.fromkeys(r["task"] for r in rows))
        n = max(r["n"] for r in rows)
        lines += [f"## Linear probes ({group.replace('_', ' ')}, {n} scans, 5-fold CV within them)", "",
                  "What a linear model decodes from each representation the scan passes through (not the model's answers): "
                  "a representation at chance has lost the signal.", "",
                  "| representation | " + " | ".join(f"{t} ({headline(t)})" for t in tasks) + " |", "|---|" + "---|" * len(tasks)]
        for rep_name in dict.fromkeys(r["representation"] for r in rows):
            cells = []
            for t in tasks:
                hit = next((r for r in rows if r["representation"] == rep_name and r["task"] == t), None)
                cells.append(f"{hit['metrics'][headline(t)]:.3f}" if hit and headline(t) in hit["metrics"] else "-")
            lines.append(f"| {rep_name} | " + " | ".join(cells) + " |")
        lines.append("")
    for name in report.get("figures", []):
        lines += [f"![{name}]({name})", ""]
    return "\n".join(lines)


def write_report(report: dict, predictions: list[dict], where: str) -> dict[str, str]:
    """Write the report files under ``where`` (a URI); returns ``{file: uri}``."""
    loc = storage.resolve(where)
    figures = plots(report, predictions)
    report["figures"] = sorted(figures)
    files = {}
    for name, png in figures.items():
        storage.write_bytes(loc.join(name), png)
        files[name] = loc.join(name).uri
    storage.write_bytes(loc.join("predictions.json"), json.dumps(predictions, default=_json).encode())
    storage.write_bytes(loc.join("report.md"), markdown(report).encode())
    files |= {"predictions.json": loc.join("predictions.json").uri, "report.md": loc.join("report.md").uri,
              "report.json": loc.join("report.json").uri}
    storage.write_bytes(loc.join("report.json"), json.dumps(report | {"files": files}, indent=1, default=_json).encode())
    return files


def _json(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(type(v))


def plots(report: dict, predictions: list[dict]) -> dict[str, bytes]:
    """``fewshot.png`` (metric vs k per task, baselines as lines), ``confusion.png`` (the full
    or best k-shot paradigm per classification task), ``age.png`` (predicted vs true age)."""
    from fmrilm.plots import png_bytes, pyplot

    plt = pyplot()

    out = {}
    res = report["results"]
    tasks = list(dict.fromkeys(r["task"] for r in res))
    group = "heldout_subjects" if any(r["group"] == "heldout_subjects" for r in res) else (res[0]["group"] if res else None)
    kshot = [r for r in res if r["paradigm"] == "kshot_lora" and r["group"] == group]
    if kshot:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.5), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            key = headline(task)
            pts = [(r["k"], r["metrics"][key]) for r in kshot if r["task"] == task and key in r["metrics"]]
            if pts:
                ks = sorted({k for k, _ in pts})
                ax.scatter(*zip(*pts), s=12, alpha=0.5, color="C0")
                ax.plot(ks, [np.mean([v for k2, v in pts if k2 == k]) for k in ks], "-o", color="C0", label="fmrilm k-shot LoRA")
                ax.set_xscale("log", base=2)
            for i, r in enumerate(x for x in res if x["task"] == task and x["group"] == group and x["paradigm"] in ("baseline", "full")):
                if key in r["metrics"]:
                    label = r["method"] if r["paradigm"] == "baseline" else "fmrilm full"
                    ax.axhline(r["metrics"][key], ls="--", lw=1, color=f"C{i + 1}", label=label)
            ax.set_title(f"{task} ({group})", fontsize=9)
            ax.set_xlabel("training scans per class (k)")
            ax.set_ylabel(key)
        axes[0][0].legend(fontsize=6)
        fig.tight_layout()
        out["fewshot.png"] = png_bytes(fig)
    cls = [t for t in tasks if headline(t) == "balanced_accuracy"]
    if cls:
        fig, axes = plt.subplots(1, len(cls), figsize=(3.6 * len(cls), 3.2), squeeze=False)
        for ax, task in zip(axes[0], cls):
            p = _best_predictions(predictions, task, group)
            if p is None:
                ax.axis("off")
                continue
            classes = report["classes"][task]
            m = np.zeros((len(classes), len(classes)), int)
            for t, q in zip(p["true"], p["pred"]):
                if t in classes and q in classes:
                    m[classes.index(t), classes.index(q)] += 1
            ax.imshow(m, cmap="Blues")
            for (i, j), v in np.ndenumerate(m):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(classes)), classes, fontsize=7, rotation=30)
            ax.set_yticks(range(len(classes)), classes, fontsize=7)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(f"{task}: {p['paradigm']}{'' if p['k'] is None else ' k=' + str(p['k'])}", fontsize=8)
        fig.tight_layout()
        out["confusion.png"] = png_bytes(fig)
    if "age" in tasks:
        fig, ax = plt.subplots(figsize=(4, 4))
        shown = [("full", "fmrilm"), ("baseline", "fc_linear"), ("baseline", "planted_pattern")]
        shown += [("vlm", q["method"]) for q in predictions if q["task"] == "age" and q["group"] == group and q["paradigm"] == "vlm"]
        for i, (paradigm, method) in enumerate(shown):
            p = next((q for q in predictions if q["task"] == "age" and q["group"] == group and q["paradigm"] == paradigm
                      and q["method"] == method), None)
            if p:
                ax.scatter(p["true"], p["pred"], s=14, alpha=0.7, color=f"C{i}", label="fmrilm full" if method == "fmrilm" else method)
        lim = ax.get_xlim()
        ax.plot(lim, lim, "k:", lw=1)
        ax.set_xlabel("true age")
        ax.set_ylabel("predicted age")
        ax.legend(fontsize=7)
        fig.tight_layout()
        out["age.png"] = png_bytes(fig)
    return out


def _best_predictions(predictions: list[dict], task: str, group: str) -> dict | None:
    """The full paradigm's predictions, else those of the largest k-shot."""
    mine = [p for p in predictions if p["task"] == task and p["group"] == group and p["method"] == "fmrilm"]
    full = [p for p in mine if p["paradigm"] == "full"]
    if full:
        return full[0]
    shots = sorted((p for p in mine if p["paradigm"] == "kshot_lora"), key=lambda p: (p["k"], -(p["seed"] or 0)))
    return shots[-1] if shots else (mine[0] if mine else None)
