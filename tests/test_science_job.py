"""The science job's pure parts: variant overrides, target checks, the ablation table, probes."""

import numpy as np
import pytest

from fmrilm.data.instructions import with_descriptions
from fmrilm.eval.probes import code_histogram, cv_probe
from fmrilm.science import ScienceSpec, ablation, markdown, met, probe_rows, targets, variant_overrides


def _res(task, paradigm, method, value, key, ci=None, k=None, **extra):
    return {"group": "heldout_subjects", "task": task, "paradigm": paradigm, "method": method, "k": k, "n": 160,
            "metrics": {key: value, **extra.pop("more", {})}, "ci": {key: ci} if ci else {}, **extra}


def _gap(a, b, half=0.03, p=None):
    return {"gap": a - b, "ci": (a - b - half, a - b + half), "n": 160, **({"mcnemar_p": p} if p is not None else {})}


def _report(sex=0.9, fc=0.91, mae=6.0, ridge=5.5, r=0.6, parse=1.0, kshot_ci=(0.55, 0.7)):
    vs_sex = {"best_classical": _gap(sex, fc, p=0.3), "fc_linear": _gap(sex, fc, p=0.3)}
    vs_age = {"best_classical": _gap(mae, ridge, 0.3), "fc_linear": _gap(mae, ridge, 0.3)}
    return {"groups": {"train": 448, "heldout_subjects": 160}, "files": {"report.md": "x/report.md"}, "results": [
        _res("sex", "full", "fmrilm", sex, "balanced_accuracy", (sex - 0.05, sex + 0.04), more={"auc": 0.95}, vs=vs_sex),
        _res("sex", "baseline", "fc_linear", fc, "balanced_accuracy", (fc - 0.05, fc + 0.04)),
        _res("sex", "baseline", "best_classical", fc, "balanced_accuracy", (fc - 0.05, fc + 0.04), reader="prewhitened_fc_linear"),
        _res("sex", "baseline", "majority", 0.5, "balanced_accuracy"),
        _res("age", "full", "fmrilm", mae, "mae", (mae - 1, mae + 1), more={"pearson_r": r}, parse_rate=parse, vs=vs_age),
        _res("age", "baseline", "fc_linear", ridge, "mae"),
        _res("age", "baseline", "best_classical", ridge, "mae", reader="combined_linear"),
        _res("sex", "kshot_lora", "fmrilm", 0.62, "balanced_accuracy", kshot_ci, k=8, seed=0),
        _res("sex", "in_context", "fmrilm", 0.55, "balanced_accuracy", (0.45, 0.62), k=2)]}


def test_targets_are_checked_against_measured_values():
    spec = ScienceSpec()
    rows = {t["target"]: t for t in targets(_report(), spec.targets)}
    assert all(t["met"] for t in rows.values()), [t for t in rows.values() if not t["met"]]
    bad = {t["target"]: t for t in targets(_report(sex=0.8, mae=7.0, parse=0.5, kshot_ci=(0.45, 0.7)), spec.targets)}
    assert not bad["sex balanced accuracy (full)"]["met"]
    assert not bad["fmrilm minus best classical, sex (paired)"]["met"]  # CI [-0.15, -0.09] reaches below -0.05
    assert not bad["fmrilm minus best classical, age MAE (paired)"]["met"]  # CI up to 1.8 > 0.15 x 5.5
    assert "prewhitened_fc_linear 0.910" in bad["fmrilm minus best classical, sex (paired)"]["note"]
    close = {t["target"]: t for t in targets(_report(sex=0.885, fc=0.92), spec.targets)}  # point -0.035, CI [-0.065, -0.005]
    assert not close["fmrilm minus best classical, sex (paired)"]["met"]  # decided on the CI, not the point
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
    assert any(r["variant"] == "baseline: best_classical" for r in rows)
    assert rows[0]["fc_same_points"]["value"] == 0.91  # FC + logistic on the variant's own prompt time points
    assert rows[0]["in_context"]["value"] == 0.55 and rows[0]["zero_shot"] is None
    probed = {"scan_token": _report() | {"probes": [
        {"task": "sex", "group": "heldout_subjects", "representation": "LM answer state: pretrained", "n": 160, "metrics": {"balanced_accuracy": 0.61}},
        {"task": "age", "group": "heldout_subjects", "representation": "LM answer state: pretrained", "n": 160, "metrics": {"pearson_r": 0.4}},
        {"task": "sex", "group": "val", "representation": "fc (whole scan)", "n": 9, "metrics": {"balanced_accuracy": 0.9}}]}}
    probes = probe_rows(probed)
    assert probes[0]["pretrained LM's answer state"] == {"sex": 0.61, "age": 0.4} and probes[0]["FC (whole scan)"] == {"sex": None, "age": None}
    text = markdown(summary | {"probes": probes})
    assert "| scan_token | - | - | - | 0.610 / 0.400 | - | - |" in text


def test_codes_shuffled_at_test_time_have_rows_with_their_paired_fall():
    from fmrilm.eval.report import markdown as eval_markdown

    head = _report()
    head["results"].append(_res("sex", "full_shuffled_time", "fmrilm", 0.62, "balanced_accuracy", (0.55, 0.69),
                                vs={"full": _gap(0.62, 0.9, p=0.001)}))
    rows = ablation({"scan_token": head, "codes_only": _report(sex=0.52)})
    assert [r["variant"] for r in rows][:3] == ["scan_token", "scan_token, codes shuffled over time", "codes_only"]
    assert rows[1]["balanced_accuracy"]["value"] == 0.62 and rows[1]["shuffle_gap"]["gap"] == pytest.approx(-0.28)
    text = markdown({"groups": head["groups"], "headline": "scan_token", "targets": [], "ablation": rows, "reports": {}, "stages": {}})
    assert "| scan_token, codes shuffled over time | 0.620 [0.55, 0.69] |" in text and "-0.280 [-0.31, -0.25], McNemar p 0.001 |" in text
    md = eval_markdown({"pretrained": "p", "spec": {"model": "m"}, "groups": head["groups"], "results": head["results"]})
    assert "## Codes shuffled at test time" in md and "sex (heldout subjects), shuffled over time: 0.620 [0.55, 0.69]; minus unshuffled -0.280" in md
    assert "| sex | balanced_accuracy | full_shuffled_time | 0.620 [0.55, 0.69] |" in md


def test_shuffled_codes_keep_each_roi_s_codes_or_each_time_step_s_bag():
    from fmrilm.artifacts.tokens import shuffle_codes, shuffle_order

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 64, (6, 40))
    feats = rng.normal(size=(6, 40, 3))
    order = shuffle_order(codes.shape, "time", rng)
    by_time, f = shuffle_codes(codes, order), shuffle_codes(feats, order)
    assert (np.sort(by_time, axis=1) == np.sort(codes, axis=1)).all() and (by_time != codes).mean() > 0.5  # each ROI keeps its codes
    assert f.shape == feats.shape and np.allclose(f[..., 0], feats[..., 0][order]) and (f[2, :, 1] == feats[2, order[1][2], 1]).all()
    by_roi = shuffle_codes(codes, shuffle_order(codes.shape, "rois", rng))
    assert (np.sort(by_roi, axis=0) == np.sort(codes, axis=0)).all() and (by_roi != codes).mean() > 0.5  # each step keeps its bag
    again = shuffle_codes(codes, shuffle_order(codes.shape, "time", np.random.default_rng(0)))
    assert (shuffle_codes(codes, shuffle_order(codes.shape, "time", np.random.default_rng(0))) == again).all()  # seeded
    with pytest.raises(ValueError, match="time or rois"):
        shuffle_order(codes.shape, "space", rng)
    from pydantic import ValidationError

    from fmrilm.eval.run import EvalSpec

    with pytest.raises(ValidationError, match="ask the full paradigm again: add full to paradigms"):
        EvalSpec(shuffles=["time"], paradigms=["zero_shot"])
    assert EvalSpec(shuffles=["time", "rois"]).shuffles == ["time", "rois"]


def test_scan_blocks_shuffle_every_scan_and_keep_the_scan_vector():
    from fmrilm.errors import UserError
    from fmrilm.artifacts.tokens import ScanBlocks

    rng = np.random.default_rng(1)
    blocks = object.__new__(ScanBlocks)  # what an export's tokens give, without the export
    blocks.codes = {f"s{i}": rng.integers(0, 32, (5, 12)) for i in range(3)}
    blocks.feats = {k: np.stack([c, -c], axis=-1) * 0.5 for k, c in blocks.codes.items()}  # features that name their code
    blocks.vectors, blocks.tokenizer_cfg = {"s0": np.ones(10)}, {"model": {"layout": "roi"}}
    by_time = blocks.shuffled("time", seed=3)
    for k, c in blocks.codes.items():
        assert (np.sort(by_time.codes[k], axis=1) == np.sort(c, axis=1)).all() and (by_time.codes[k] != c).any()
        assert (by_time.feats[k][..., 0] == by_time.codes[k] * 0.5).all()  # the features moved with their codes
    assert by_time.vectors is blocks.vectors and (blocks.shuffled("time", seed=3).codes["s1"] == by_time.codes["s1"]).all()
    blocks.tokenizer_cfg = {"model": {"layout": "state"}}
    with pytest.raises(UserError, match="one code per ROI"):
        blocks.shuffled("rois")


def test_summary_with_repeats_and_the_dynamics_cohort():
    from fmrilm.science import plan, summarise

    spec = ScienceSpec(repeats=3, select=["scan_token", "codes_only"])
    chains = plan(spec)
    assert [(c["cohort"], c["variant"], c["repeat"]) for c in chains] == [
        ("main", "scan_token", 0), ("main", "scan_token", 1), ("main", "scan_token", 2), ("main", "codes_only", 0),
        ("dynamics", "scan_token", 0), ("dynamics", "scan_token", 1), ("dynamics", "scan_token", 2)]
    assert len({c["tag"] for c in chains if c["cohort"] == "main"}) == 4
    assert "train.seed=2" in variant_overrides(spec, "scan_token", 2)["instruct"]
    assert "tasks=[diagnosis, sex, age]" in variant_overrides(spec, "scan_token", 0, dynamics=True)["eval"]
    sexes = iter([0.88, 0.9, 0.92, 0.6, 0.8, 0.82, 0.84])
    for c in chains:
        c |= {"report": _report(sex=next(sexes)), "stages": [{"stage": "eval", "status": "ran", "seconds": 1}]}
    out = summarise(spec, chains)
    sex = next(r for r in out["spread"] if r["metric"] == "balanced_accuracy" and r["task"] == "sex")
    assert sex["repeats"] == 3 and abs(sex["mean"] - 0.9) < 1e-9 and abs(sex["sd"] - 0.02) < 1e-9
    assert out["dynamics"]["spread"][0]["mean"] == np.mean([0.8, 0.82, 0.84])
    text = markdown(out)
    assert "## Run-to-run spread" in text and "## The dynamics cohort" in text and "(prewhitened_fc_linear)" in text
    assert "0.900 +/- 0.020" in text and "scan_token (repeat 2) [dynamics]" in text
    assert ScienceSpec(dynamics=None).dynamics is None and len(plan(ScienceSpec(dynamics=None))) == 4


def test_a_fresh_seed_confirms_the_targets():
    from fmrilm.science import cohorts, plan, summarise

    spec = ScienceSpec(select=["scan_token"], fresh_seed=1001, dynamics=None)
    assert cohorts(spec)["fresh"][0].seed == 1001 and cohorts(spec)["fresh"][1].endswith("fresh-seed")
    chains = plan(spec)
    assert [(c["cohort"], c["variant"]) for c in chains] == [("main", "scan_token"), ("fresh", "scan_token")]
    for c, sex in zip(chains, (0.9, 0.7)):
        c |= {"report": _report(sex=sex), "stages": []}
    out = summarise(spec, chains)
    assert all(t["met"] for t in out["targets"]) and not met(out)  # the fresh seed misses: the job does too
    assert "## Confirmation on a fresh seed (1001)" in markdown(out)


def test_variants_add_to_the_shared_overrides():
    spec = ScienceSpec(overrides={"pretrain": ["train.max_steps=5"]})
    assert variant_overrides(spec, "codes_only")["pretrain"] == ["train.max_steps=5", "scan_token=false"]
    assert "paradigms=[full]" in variant_overrides(spec, "codes_only")["eval"]  # ablations score the full paradigm only
    assert variant_overrides(spec, "scan_token")["eval"] == ["shuffles=[time, rois]"]  # the headline: every paradigm, and its codes shuffled
    from fmrilm.config import ConfigError
    from fmrilm.science import check

    with pytest.raises(ConfigError, match="headline"):
        check(ScienceSpec(headline="nope"))
    with pytest.raises(ConfigError, match="variant 'x' overrides \\['features'\\]"):
        check(ScienceSpec(variants={**ScienceSpec().variants, "x": {"features": ["ica_components=3"]}}))


def test_variants_with_the_same_tokenizer_settings_share_one_tokenizer_run():
    from fmrilm.science import plan

    conn = ["model.layout=connectivity"]
    variants = {"scan_token": {}, "tokens": {"tokenizer": conn, "pretrain": ["scan_token=false"]},
                "tokens_no_text": {"tokenizer": list(conn), "pretrain": ["objectives={fmri_fmri: 1.0}"]}, "other": {"tokenizer": ["model.patch=8"]}}
    own = {c["variant"]: c["own"] for c in plan(ScienceSpec(variants=variants, dynamics=None))}
    assert own == {"scan_token": {}, "tokens": {"tokenize": "-tokens", "tokenizer": "-tokens"},
                   "tokens_no_text": {"tokenize": "-tokens", "tokenizer": "-tokens"}, "other": {"tokenize": "-other", "tokenizer": "-other"}}


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
    assert cv_probe(x[:5], y[:5], False) == {}  # two of a class: no fold could fit the penalty by inner CV
    assert "balanced_accuracy" in cv_probe(x[:6], y[:6], False)
    codes = np.array([[1, 2, 3, 4], [1, 2, 0, 0]])
    np.testing.assert_allclose(code_histogram(codes, 6), [2 / 8, 2 / 8, 2 / 8, 1 / 8, 1 / 8, 0])


def test_descriptions_follow_each_scan_block():
    prompt = "<scan:a>### Question: q\n### Answer: x\n\n<scan:b>### Question: q\n### Answer:"
    out = with_descriptions(prompt, {"a": "strong coupling"})
    assert out.startswith("<scan:a>strong coupling\n### Question") and "<scan:b>### Question" in out


def test_bench_science_confirms_on_a_fresh_seed_and_exits_1_on_a_missed_target(monkeypatch, tmp_path):
    """`fmrilm bench science` runs the spec with fresh_seed = synth.seed + 1000 (unless set) and
    exits 1 when a target, on either seed, is missed (the chains themselves: tests/integration/test_science.py)."""
    import fmrilm.science
    from typer.testing import CliRunner

    from fmrilm.cli import app
    from fmrilm.science import plan, summarise

    seen = []

    def fake_run(spec):
        seen.append(spec)
        chains = plan(spec)
        for c, sex in zip(chains, (0.9, 0.7 if spec.synth.seed == 4 else 0.9)):
            c |= {"report": _report(sex=sex), "stages": []}
        return summarise(spec, chains) | {"files": {"science.md": "x/science.md", "science.json": "x/science.json"}}

    monkeypatch.setattr(fmrilm.science, "run", fake_run)
    spec = tmp_path / "science.yaml"
    spec.write_text("kind: science\nsynth: {seed: 4}\nselect: [scan_token]\ndynamics: null\n")
    r = CliRunner().invoke(app, ["bench", "science", "--spec", str(spec)])
    assert r.exit_code == 1 and seen[-1].fresh_seed == 1004, r.output  # the fresh seed misses: so does the job
    assert "## Confirmation on a fresh seed (1004)" in r.output
    r = CliRunner().invoke(app, ["bench", "science", "--spec", str(spec), "synth.seed=5", "fresh_seed=77"])
    assert r.exit_code == 0 and seen[-1].fresh_seed == 77, r.output
