import numpy as np
from scipy import stats

from fmrilm.data import synth
from fmrilm.data.signal import robust_scale
from fmrilm.data.synth import SynthParams


def test_reproducible_under_a_seed_and_different_across_seeds():
    p = SynthParams(subjects=4, n_rois=16, n_networks=4, n_timepoints=50, seed=11)
    a, b = synth.simulate_scan(p, 2), synth.simulate_scan(p, 2)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (16, 50)
    assert not np.allclose(a, synth.simulate_scan(p.model_copy(update={"seed": 12}), 2))
    assert synth.subject(p, 3) == synth.subject(p, 3)
    # a subject does not depend on how many subjects the cohort has
    np.testing.assert_array_equal(a, synth.simulate_scan(p.model_copy(update={"subjects": 40}), 2))


def test_any_shape_and_raw_intensity_scale():
    p = SynthParams(subjects=1, n_rois=9, n_networks=3, n_timepoints=17, tr=0.8)
    ts = synth.simulate_scan(p, 0)
    assert ts.shape == (9, 17)
    assert ts.mean() > 400  # raw intensities, normalisation is needed
    assert len(synth.roi_labels(p)) == 9 and len(set(synth.roi_networks(p))) == 3


def _network_fc(p, idx):
    nets = synth.roi_networks(p)
    names = synth.network_names(p)
    a = np.flatnonzero(nets == names.index("DefaultMode"))
    b = np.flatnonzero(nets == names.index("Frontoparietal"))
    fc = np.corrcoef(robust_scale(synth.simulate_scan(p, idx)))
    return fc[np.ix_(a, b)].mean(), fc


def test_planted_sex_effect_is_measurable_and_oracle_separates():
    p = SynthParams(subjects=80, n_rois=28, n_timepoints=300, seed=5)
    sexes = np.array([synth.subject(p, i)["sex"] for i in range(p.subjects)])
    values, fcs = zip(*(_network_fc(p, i) for i in range(p.subjects)))
    values = np.array(values)
    # planted: DMN-FPN coupling higher in F by sex_effect * w_i w_j (w ~ 0.5-0.85)
    diff = values[sexes == "F"].mean() - values[sexes == "M"].mean()
    assert diff > 0.05
    assert stats.ttest_ind(values[sexes == "F"], values[sexes == "M"]).pvalue < 1e-4
    scores = synth.oracle_scores(p, np.stack(fcs))["sex"]
    auc = stats.mannwhitneyu(scores[sexes == "F"], scores[sexes == "M"]).statistic / ((sexes == "F").sum() * (sexes == "M").sum())
    assert auc > 0.85


def test_expected_fc_matches_simulation():
    p = SynthParams(subjects=1, n_rois=14, n_networks=7, n_timepoints=4000, tr=2.0, seed=2)
    r = synth.network_coupling(p, 0)
    emp = np.corrcoef(synth.simulate_scan(p, 0))
    expected = synth.expected_fc(p, r)
    iu = np.triu_indices(14, 1)
    assert np.abs(emp[iu] - expected[iu]).mean() < 0.05


def test_oracle_records_the_planted_patterns():
    p = SynthParams()
    truth = synth.oracle(p)
    names = truth["networks"]
    i, j = names.index("DefaultMode"), names.index("Frontoparietal")
    assert truth["network_patterns"]["sex"][i][j] == p.sex_effect
    assert truth["roi_patterns"]["sex"].shape == (p.n_rois, p.n_rois)
    extra = synth.manifest_extra(p)
    assert set(extra["roi_networks"].values()) == set(names)
