"""Model cards: the ``README.md`` of every export, written from what the run knows.

A tokenizer artifact's card holds its architecture, codebook statistics, input contract
(:mod:`fmrilm.data.contract`), training data and validation figures; an LM export's card its
stage, backbone and licence, fMRI vocabulary and inputs, the input contract, training data,
how to load it with plain transformers (+ peft), and, once ``fmrilm eval`` has scored it, the
held-out figures beside majority and FC + linear. Pure text from the exports' metadata;
:func:`write_card` stores it.
"""

from __future__ import annotations

from fmrilm import storage

BUILTIN_LICENCE = "randomly initialised inside fmrilm (no pretrained weights, nothing licensed)"
HEADLINE = {"classification": ("balanced_accuracy", "balanced accuracy"), "regression": ("mae", "MAE")}
BASELINES = {"majority": "majority", "mean": "training mean", "fc_linear": "FC + linear (the prompt's time points)",
             "fc_linear_whole_scan": "FC + linear (whole scan)", "descriptors_linear": "descriptors + linear",
             "fc_linear_deconfounded": "FC + linear, site and motion regressed out"}


def _contract_lines(contract: dict | None) -> list[str]:
    if not contract:
        return ["Not recorded (trained before input contracts were written): atlas and TR are unchecked."]
    labels = contract.get("roi_labels") or []
    shown = ", ".join(labels[:6]) + (f", ... ({len(labels)} in all)" if len(labels) > 6 else "")
    return [
        f"- atlas `{contract['atlas']}`, {contract['n_rois']} ROIs in this order: {shown or 'unlabelled'}",
        f"- native TR {contract.get('tr')} s; resampled to {contract['target_tr']} s" if contract.get("target_tr")
        else f"- native TR {contract.get('tr')} s, not resampled (scans at another TR are refused)",
        f"- windows of {contract['window']} time points (stride {contract['stride']}), patches of {contract['patch']}; "
        f"{'per-ROI robust scaling' if contract['normalise'] else 'no normalisation'}",
        "- another atlas or ROI order is refused unless read with `data.atlas_mapping=position`",
    ]


def _data_lines(split: dict | None, contract: dict | None) -> list[str]:
    versions = (split or {}).get("datasets") or (contract or {}).get("datasets") or {}
    lines = [f"- `{name}` version `{version}`" for name, version in sorted(versions.items())]
    subjects = (split or {}).get("trained_subjects")
    if subjects is not None:
        lines.append(f"- {len(subjects)} training subjects (listed in `fmri_lm.json` / `config.json`); every other subject "
                     "is held out, and `fmrilm eval` refuses to score a subject this model trained on")
    policy = (split or {}).get("policy")
    lines.append(f"- split: {policy or 'each dataset manifest policy (seeded hash of dataset/subject, or its split file)'}")
    return lines or ["Not recorded."]


def _licence(backbone: dict) -> str:
    from fmrilm.models.offline import OFFLINE

    if backbone.get("kind") == "builtin":
        return BUILTIN_LICENCE
    if backbone.get("source") in OFFLINE:
        b = OFFLINE[backbone["source"]]
        return f"{b.model}, {b.parameters} parameters, licence {b.licence}"
    return f"`{backbone.get('source')}`: see its own model card for the licence"


def _loading(meta: dict, where: str) -> list[str]:
    layout = meta.get("layout")
    if layout == "full":
        code = [f'model = AutoModelForCausalLM.from_pretrained("{where}/full")',
                f'tokenizer = AutoTokenizer.from_pretrained("{where}/full")']
    elif layout == "base+adapter":
        code = [f'base = AutoModelForCausalLM.from_pretrained("{where}/base")',
                f'model = PeftModel.from_pretrained(base, "{where}/adapter")',
                f'tokenizer = AutoTokenizer.from_pretrained("{where}/base")']
    else:
        code = [f'base = ...  # the base export {meta.get("base_model")}, loaded (and merged) as its own card says',
                f'model = PeftModel.from_pretrained(base, "{where}/adapter")',
                f'tokenizer = AutoTokenizer.from_pretrained("{where}/adapter")']
    lines = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             *(["from peft import PeftModel"] if layout != "full" else []), *code, "```"]
    if meta.get("scan_dim") or meta.get("feature_width"):
        lines.append("The continuous fMRI inputs (scan-level token, encoder features) go through projectors stored in "
                     "`inputs.safetensors`; `fmrilm.artifacts.lm.load_exported` wraps the model with them.")
    lines.append(f"With fmrilm: `from fmrilm.artifacts.lm import load_exported; model, tokenizer, meta = load_exported(\"{where}\")`.")
    return lines


def evaluation_lines(report: dict) -> list[str]:
    """Markdown rows of a ``fmrilm eval`` report: per task and held-out group, the full paradigm
    (else the best other fmrilm paradigm) beside majority/mean and the FC + linear baselines, with
    n and 95 % bootstrap CIs."""
    from fmrilm.data.instructions import REGRESSION

    lines = ["| task | held-out group | method | n | metric | value [95 % CI] |", "|---|---|---|---|---|---|"]
    rows = report.get("results", [])
    for task in dict.fromkeys(r["task"] for r in rows):
        key, label = HEADLINE["regression" if task in REGRESSION else "classification"]
        for group in dict.fromkeys(r["group"] for r in rows if r["task"] == task):
            mine = [r for r in rows if r["task"] == task and r["group"] == group and key in r["metrics"]]
            ours = [r for r in mine if r["method"] == "fmrilm" and r["paradigm"] == "full"] or \
                   [r for r in mine if r["method"] == "fmrilm" and r["paradigm"] in ("in_context", "zero_shot")][:1]
            base = [r for m in BASELINES for r in mine if r["method"] == m and r["paradigm"] == "baseline"]
            for r in ours + base:
                lo, hi = r.get("ci", {}).get(key, (None, None))
                ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None else ""
                name = f"fmrilm ({r['paradigm']})" if r["method"] == "fmrilm" else BASELINES[r["method"]]
                lines.append(f"| {task} | {group} | {name} | {r['n']} | {label} | {r['metrics'][key]:.3f}{ci} |")
    return lines


def lm_card(meta: dict, where: str, report: dict | None = None, report_uri: str | None = None) -> str:
    """The card of an LM export at ``where`` from its ``fmri_lm.json`` ``meta``; with an eval
    ``report`` (and where it lives), its held-out figures."""
    backbone, vocab = meta.get("backbone", {}), meta.get("vocab", {})
    stage = meta.get("stage", "pretrain")
    kshot = meta.get("kshot") or {}
    what = {"instruct": "instruction-tuned to answer questions on " + ", ".join(meta.get("tasks") or {}),
            "kshot": f"LoRA-tuned on {kshot.get('k')} training scan(s) per class to answer {kshot.get('task')} (k-shot, seed "
                     f"{kshot.get('seed')})"}.get(stage, "pretrained jointly on fMRI token sequences, fMRI-caption pairs and captions")
    inputs = ["discrete codes `<fmri_0>`...`<fmri_{}>`".format(vocab.get("num_codes", 1) - 1)]
    if meta.get("feature_width"):
        inputs.append(f"encoder features (width {meta['feature_width']}) through a projector")
    if meta.get("scan_dim"):
        inputs.append(f"a scan-level token ({meta['scan_dim']} ROI pairs of encoder-feature connectivity) through a projector")
    lines = [
        f"# fmrilm {stage} export", "",
        f"A causal language model that reads parcellated resting-state fMRI as tokens, {what}. "
        f"Layout `{meta.get('layout')}`{' (LoRA)' if meta.get('lora') else ''}; sequences of {meta.get('seq_len')} tokens"
        + (f"; {meta['fmri_steps']} time step(s) of codes per prompt" if meta.get("fmri_steps") else "") + ".", "",
        "## Backbone", "", f"- `{backbone.get('source')}` ({backbone.get('family')}): {_licence(backbone)}",
        f"- fMRI vocabulary: {vocab.get('num_codes')} codes from the tokenizer `{meta.get('tokenizer')}`, rows initialised "
        f"by `{backbone.get('code_init')}`", f"- fMRI inputs: {'; '.join(inputs)}",
        *([f"- base export: `{meta['base_model']}`"] if meta.get("base_model") else []), "",
        "## Input contract", "", *_contract_lines(meta.get("contract")), "",
        "## Training data", "", *_data_lines(meta.get("split"), meta.get("contract")), "",
        "## Loading", "", *_loading(meta, where), "",
        "## Evaluation", "",
    ]
    if report:
        lines += [f"Held-out subjects only ({report_uri or 'fmrilm eval'}); 95 % bootstrap CIs within class.", "",
                  *evaluation_lines(report)]
    else:
        lines.append("Not evaluated yet: `fmrilm eval` writes its held-out figures here.")
    return "\n".join(lines) + "\n"


def tokenizer_card(cfg: dict, stats: dict, where: str, metrics: dict | None = None) -> str:
    """The card of a tokenizer artifact at ``where`` from its ``config.json`` (``cfg``), codebook
    ``stats`` and, when known, its final validation ``metrics``."""
    m, a = cfg["model"], cfg.get("alignment", {})
    lines = [
        "# fmrilm tokenizer", "",
        f"A vector-quantised autoencoder of parcellated fMRI: patches of {m['patch']} time points per ROI, a {m['depth']}-layer "
        f"transformer encoder of width {m['width']}, {m['num_codes']} codes of dimension {m['code_dim']}, a decoder of the "
        f"normalised signal. Domain classifier (fMRI vs text tokens, `{a.get('text_source')}`): "
        + (f"weight {a.get('domain_weight')}, adversary `{a.get('adversary')}`." if a.get("domain_weight") else "off."), "",
        f"Codebook: {stats.get('used_fraction', float('nan')):.0%} of codes used, perplexity {stats.get('perplexity', float('nan')):.1f}; "
        f"trained {cfg.get('step')} steps (run `{cfg.get('run')}`).", "",
        "## Input contract", "", *_contract_lines(cfg.get("contract")), "",
        "## Training data", "", *_data_lines(cfg.get("split"), cfg.get("contract")), "",
        "## Validation (held-out subjects)", "",
    ]
    shown = {k: v for k, v in (metrics or {}).items() if k.startswith("val/") and isinstance(v, (int, float))}
    if shown:
        lines += ["| metric | value |", "|---|---|", *(f"| {k.removeprefix('val/')} | {v:.3f} |" for k, v in sorted(shown.items()))]
    else:
        lines.append("No validation subjects in this run; `fmrilm tokenizer eval` reports them.")
    lines += ["", "## Loading", "", "```python", "from fmrilm.artifacts.tokenizer import load_tokenizer",
              f'model, config = load_tokenizer("{where}")  # model.tokenize_with_features(x [batch, rois, time])', "```"]
    return "\n".join(lines) + "\n"


def write_card(uri: str, text: str) -> str:
    """Write ``text`` as ``README.md`` of the export folder ``uri``; returns the file's URI."""
    loc = storage.resolve(uri).join("README.md")
    storage.write_text(loc, text)
    return loc.uri
