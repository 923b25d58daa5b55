"""The dynamic effects of the synthetic generator, the classical readers, and paired comparisons.

Each dynamic effect carries the Case/Control diagnosis: static FC + logistic stays at chance (its
CI includes 0.5) while the reader matched to the effect finds it (>= 0.8), at the default strengths.
"""

import numpy as np
import pytest

from fmrilm.data import synth
from fmrilm.eval import baselines, metrics
from fmrilm.features import dynamics

MATCHED = {"timescale": "timescale", "lag": "lagged_fc", "dwell": "windowed_fc", "bursts": "amplitude"}


def _balanced_accuracy_with_ci(params, reader, n_train):
    nets = [synth.network_names(params)[k] for k in synth.roi_networks(params)]
    x = np.stack([dynamics.read(reader, synth.simulate_scan(params, i), nets) for i in range(params.subjects)])
    y = np.array([synth.subject(params, i)["diagnosis"] for i in range(params.subjects)], dtype=object)
    pred, _ = baselines.linear_classifier(x[:n_train], y[:n_train], x[n_train:], list(synth.DIAGNOSES))
    chance = np.full(len(pred), "Control", dtype=object)  # balanced accuracy 0.5 on every resample
    gap = metrics.paired_gap(metrics.balanced_accuracy, y[n_train:], pred, chance, n=500, strata=y[n_train:])
    return 0.5 + gap["gap"], (0.5 + gap["ci"][0], 0.5 + gap["ci"][1])


@pytest.mark.parametrize("effect", synth.DYNAMIC_EFFECTS)
def test_dynamic_effect_is_invisible_to_fc_and_visible_to_its_reader(effect):
    params = synth.SynthParams(subjects=300, dynamic_effects=[effect], seed=11)
    _, (lo, hi) = _balanced_accuracy_with_ci(params, "fc", 180)
    assert lo <= 0.5 <= hi, f"{effect}: static FC + logistic reads it ({lo:.2f}, {hi:.2f})"
    score, _ = _balanced_accuracy_with_ci(params, MATCHED[effect], 180)
    assert score >= 0.8, f"{effect}: {MATCHED[effect]} reads only {score:.2f}"


def test_dynamics_leave_the_static_cohort_alone():
    plain, dyn = synth.SynthParams(subjects=20), synth.SynthParams(subjects=20, dynamic_effects=["lag"])
    for i in range(20):
        a, b = synth.subject(plain, i), synth.subject(dyn, i)
        assert a["diagnosis"] is None and b["diagnosis"] in synth.DIAGNOSES
        assert {k: a[k] for k in ("sex", "age", "site")} == {k: b[k] for k in ("sex", "age", "site")}
    assert {synth.subject(dyn, i)["diagnosis"] for i in range(20)} == set(synth.DIAGNOSES)
    np.testing.assert_array_equal(synth.simulate_scan(plain, 3), synth.simulate_scan(synth.SynthParams(subjects=20, dynamic_effects=[]), 3))


def test_readers_have_one_length_per_atlas():
    params = synth.SynthParams(subjects=4, n_rois=12, n_networks=3)
    nets = [synth.network_names(params)[k] for k in synth.roi_networks(params)]
    for reader in dynamics.READERS:
        shapes = {dynamics.read(reader, synth.simulate_scan(params, i), nets).shape for i in range(2)}
        assert len(shapes) == 1, reader
        assert np.isfinite(dynamics.read(reader, synth.simulate_scan(params, 0), None)).all(), reader
    assert dynamics.read("prewhitened_fc", synth.simulate_scan(params, 0), nets).shape == (6,)  # 3 networks: 3 within + 3 between
    assert dynamics.read("prewhitened_fc_roi", synth.simulate_scan(params, 0), nets).shape == (66,)  # 12 ROIs: every pair
    assert "prewhitened_fc_roi" not in dynamics.read_all(synth.simulate_scan(params, 0), None)  # without networks it is prewhitened_fc
    with pytest.raises(ValueError, match="unknown reader"):
        dynamics.read("nope", np.zeros((3, 10)))


def test_prewhitening_removes_the_autocorrelation():
    rng = np.random.default_rng(0)
    x = np.zeros((3, 2000))
    for t in range(1, 2000):
        x[:, t] = 0.8 * x[:, t - 1] + rng.standard_normal(3)
    assert np.all(dynamics.ar1_coefficients(x) > 0.75)
    assert np.all(np.abs(dynamics.ar1_coefficients(dynamics.prewhiten(x))) < 0.1)


def test_paired_gap_of_equal_predictors_contains_zero():
    rng = np.random.default_rng(1)
    y = rng.choice(["F", "M"], 200)
    a = np.where(rng.random(200) < 0.8, y, np.where(y == "F", "M", "F"))
    b = np.where(rng.random(200) < 0.8, y, np.where(y == "F", "M", "F"))  # the same accuracy, other errors
    gap = metrics.paired_gap(metrics.balanced_accuracy, y, a, b, strata=y)
    assert gap["ci"][0] < 0 < gap["ci"][1]
    assert metrics.mcnemar(y, a, b) > 0.05
    assert metrics.mcnemar(y, a, a) == 1.0


def test_paired_gap_of_a_clearly_worse_predictor_excludes_zero():
    rng = np.random.default_rng(2)
    y = rng.choice(["F", "M"], 200)
    good = np.where(rng.random(200) < 0.95, y, np.where(y == "F", "M", "F"))
    worse = np.where(rng.random(200) < 0.7, good, np.where(good == "F", "M", "F"))  # good with extra errors: paired
    gap = metrics.paired_gap(metrics.balanced_accuracy, y, worse, good, strata=y)
    assert gap["ci"][1] < 0
    assert metrics.mcnemar(y, worse, good) < 0.01
    assert not metrics.within(gap, 0.05) and metrics.within(gap, 0.5)
    ages = rng.uniform(10, 80, 200)
    err = metrics.paired_gap(metrics.mae, ages, ages + rng.normal(0, 8, 200), ages + rng.normal(0, 2, 200))
    assert err["ci"][0] > 0 and not metrics.within(err, 1.0, higher_is_better=False)


def test_the_best_classical_reader_is_chosen_on_training_scans():
    from fmrilm.eval import classical

    params = synth.SynthParams(subjects=160, dynamic_effects=["bursts"], seed=3)
    nets = {f"s{i}": [synth.network_names(params)[k] for k in synth.roi_networks(params)] for i in range(160)}
    series = {f"s{i}": synth.simulate_scan(params, i) for i in range(160)}
    y = np.array([synth.subject(params, i)["diagnosis"] for i in range(160)], dtype=object)
    vectors = classical.reader_vectors(series, nets)
    assert set(vectors) == set(classical.READERS)
    ids = list(series)
    outs = classical.fit_readers(vectors, ids[:120], y[:120], ids[120:], list(synth.DIAGNOSES), False)
    assert set(outs) == {f"{r}_linear" for r in classical.READERS} and all(o["cv_score"] is not None for o in outs.values())
    name, best = classical.best_of(outs)
    assert name in ("amplitude_linear", "combined_linear") and metrics.balanced_accuracy(y[120:], best["pred"]) >= 0.8
    ages = np.array([synth.subject(params, i)["age"] for i in range(160)])
    reg = classical.fit_readers({"amplitude": vectors["amplitude"]}, ids[:120], ages[:120], ids[120:], [], True, suffix="_whole_scan")
    assert set(reg) == {"amplitude_linear_whole_scan"} and reg["amplitude_linear_whole_scan"]["pred"].shape == (40,)
    assert classical.best_of({"x": {"pred": None}}) is None


def test_read_all_matches_each_reader():
    params = synth.SynthParams(subjects=2, n_rois=12, n_networks=3, dynamic_effects=["dwell"])
    nets = [synth.network_names(params)[k] for k in synth.roi_networks(params)]
    x = synth.simulate_scan(params, 1)
    for networks in (nets, None):
        every = dynamics.read_all(x, networks)
        assert set(every) == set(dynamics.readers_for(networks))
        for name in every:
            np.testing.assert_allclose(every[name], dynamics.read(name, x, networks))
