"""The science job's pure parts: variant overrides, target checks, the ablation table, probes."""

import numpy as np
import pytest

from fmrilm.data.instructions import with_descriptions
from fmrilm.eval.probes import code_agreement, cv_probe
from fmrilm.science import ScienceSpec, ablation, markdown, met, targets, variant_overrides


def _res(task, paradigm, method, value, key, ci=None, k=None, **extra):
    return {"group": "heldout_subjects", "task": task, "paradigm": paradigm, "method": method, "k": k, "n": 160,
            "metrics": {key: value, **extra.pop("more", {})}, "ci": {key: ci} if ci else {}, **extra}


def _report(sex=0.9, fc=0.92, mae=6.0, ridge=5.5, r=0.6, parse=1.0, kshot_ci=(0.55, 0.7)):
    return {"groups": {"train": 448, "heldout_subjects": 160}, "files": {"report.md": "x/report.md"}, "results": [
        _res("sex", "full", "fmrilm", sex, "balanced_accuracy", (sex - 0.05, sex + 0.04), more={"auc": 0.95}),
        _res("sex", "baseline", "fc_linear", fc, "balanced_accuracy", (fc - 0.05, fc + 0.04)),
        _res("sex", "baseline", "majority", 0.5, "balanced_accuracy"),
        _res("age", "full", "fmrilm", mae, "mae", (mae - 1, mae + 1), more={"pearson_r": r}, parse_rate=parse),
        _res("age", "baseline", "fc_linear", ridge, "mae"),
        _res("sex", "kshot_lora", "fmrilm", 0.62, "balanced_accuracy", kshot_ci, k=8, seed=0),
        _res("sex", "in_context", "fmrilm", 0.55, "balanced_accuracy", (0.45, 0.62), k=2)]}


def test_targets_are_checked_against_measured_values():
    spec = ScienceSpec()
    rows = {t["target"]: t for t in targets(_report(), spec.targets)}
    assert all(t["met"] for t in rows.values()), [t for t in rows.values() if not t["met"]]
    bad = {t["target"]: t for t in targets(_report(sex=0.8, mae=7.0, parse=0.5, kshot_ci=(0.45, 0.7)), spec.targets)}
    assert not bad["sex balanced accuracy (full)"]["met"]
    assert not bad["FC + logistic minus fmrilm (same time points)"]["met"]  # 0.92 - 0.80 > 0.05
    assert not bad["age MAE (full)"]["met"]  # 7.0 > 1.15 x 5.5
    assert not bad["age answers that parse as numbers (full)"]["met"]
    assert not bad["sex k-shot LoRA k=8 (worst seed)"]["met"]  # its CI includes chance
    missing = targets({"results": [], "groups": {}}, spec.targets)  # nothing measured: nothing met
    assert not any(t["met"] for t in missing if t["bar"] != "reported")


def test_ablation_table_and_markdown():
    reports = {"scan_token": _report(), "codes_only": _report(sex=0.52)}
    rows = ablation(reports)
    assert [r["variant"] for r in rows][:2] == ["scan_token", "codes_only"]
    assert rows[1]["balanced_accuracy"]["value"] == 0.52 and any(r["variant"] == "baseline: fc_linear" for r in rows)
    summary = {"groups": _report()["groups"], "headline": "scan_token", "targets": targets(_report(), ScienceSpec().targets),
               "ablation": rows, "reports": {"scan_token": "a.md"}, "stages": {"scan_token": [{"stage": "eval", "status": "ran", "seconds": 3}]}}
    text = markdown(summary)
    assert "| codes_only | 0.520" in text and "Targets" in text and met(summary)


def test_variants_add_to_the_shared_overrides():
    spec = ScienceSpec(overrides={"pretrain": ["train.max_steps=5"]})
    assert variant_overrides(spec, "codes_only")["pretrain"] == ["train.max_steps=5", "scan_token=false"]
    assert "paradigms=[full]" in variant_overrides(spec, "codes_only")["eval"]  # ablations score the full paradigm only
    assert "eval" not in variant_overrides(spec, "scan_token")
    from fmrilm.config import ConfigError
    from fmrilm.science import check

    with pytest.raises(ConfigError, match="headline"):
        check(ScienceSpec(headline="nope"))


def test_select_runs_some_variants_headline_first():
    from fmrilm.config import ConfigError
    from fmrilm.science import check, selected

    assert selected(ScienceSpec(headline="descriptions", select=["codes_only", "descriptions"])) == ["descriptions", "codes_only"]
    assert selected(ScienceSpec())[0] == "scan_token" and len(selected(ScienceSpec())) == 4
    with pytest.raises(ConfigError, match="unknown variant"):
        check(ScienceSpec(select=["nope"]))
    with pytest.raises(ConfigError, match="headline 'scan_token' is not one of the variants to run"):
        check(ScienceSpec(select=["codes_only"]))


def test_probes_find_a_signal_and_not_noise():
    rng = np.random.default_rng(0)
    y = np.array(["A", "B"] * 40, dtype=object)
    x = rng.normal(size=(80, 5))
    signal = x + (y == "B")[:, None] * 2.0
    assert cv_probe(signal, y, False)["balanced_accuracy"] > 0.85
    assert cv_probe(x, y, False)["balanced_accuracy"] < 0.7
    age = rng.uniform(20, 60, 80)
    assert cv_probe(np.c_[age + rng.normal(size=80), x], age, True)["pearson_r"] > 0.9
    assert cv_probe(x[:3], y[:3], False) == {}  # too few rows per class: no number rather than a wrong one
    codes = np.array([[1, 2, 3, 4], [1, 2, 0, 0], [5, 5, 5, 5]])
    np.testing.assert_allclose(code_agreement(codes), [0.5, 0.0, 0.0])


def test_descriptions_follow_each_scan_block():
    prompt = "<scan:a>### Question: q\n### Answer: x\n\n<scan:b>### Question: q\n### Answer:"
    out = with_descriptions(prompt, {"a": "strong coupling"})
    assert out.startswith("<scan:a>strong coupling\n### Question") and "<scan:b>### Question" in out
