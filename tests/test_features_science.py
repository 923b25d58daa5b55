"""Each descriptor against a reference computation on small inputs."""

import networkx as nx
import numpy as np
import pytest
from sklearn.covariance import LedoitWolf

from fmrilm.features import captions, connectivity, gradients, graph, ica


def _ts(seed=0, rois=6, t=200):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(2, t))
    mix = rng.normal(size=(rois, 2))
    return mix @ base + rng.normal(size=(rois, t))


def test_pearson_matches_numpy():
    ts = _ts()
    np.testing.assert_allclose(connectivity.pearson_fc(ts), np.corrcoef(ts), atol=1e-10)


def test_partial_correlation_is_ledoit_wolf_precision():
    ts = _ts(1)
    prec = np.linalg.inv(LedoitWolf().fit(ts.T).covariance_)
    d = np.sqrt(np.diag(prec))
    expected = -prec / np.outer(d, d)
    np.fill_diagonal(expected, 1.0)
    np.testing.assert_allclose(connectivity.partial_fc(ts), expected, atol=1e-6)


def test_network_means_on_a_hand_built_matrix():
    fc = np.array([[1, 0.8, 0.1, 0.2], [0.8, 1, 0.3, 0.4], [0.1, 0.3, 1, 0.6], [0.2, 0.4, 0.6, 1]])
    names, m = connectivity.network_means(fc, ["A", "A", "B", "B"])
    assert names == ["A", "B"]
    np.testing.assert_allclose(m, [[0.8, 0.25], [0.25, 0.6]])
    top, bottom = connectivity.extreme_pairs({"A~B": 0.25, "A~C": 0.9, "B~C": -0.2})
    assert top == ["A~C"] and bottom == ["B~C"]


def test_proportional_threshold_keeps_the_strongest_edges():
    fc = np.array([[1, 0.9, -0.8, 0.1], [0.9, 1, 0.2, 0.3], [-0.8, 0.2, 1, 0.05], [0.1, 0.3, 0.05, 1]])
    adj = graph.proportional_threshold(fc, density=2 / 6)
    assert set(zip(*np.nonzero(np.triu(adj)))) == {(0, 1), (0, 2)}
    assert adj[0, 2] == pytest.approx(0.8)  # |FC|


def test_global_efficiency_and_clustering_match_networkx():
    g = nx.Graph([(0, 1), (1, 2), (2, 0), (2, 3), (3, 4)])
    adj = nx.to_numpy_array(g)
    m = graph.graph_metrics(adj * 0.5 + np.eye(5), ["a"] * 5, density=5 / 10)
    assert m["global_efficiency"] == pytest.approx(nx.global_efficiency(g))
    # networkx weighs clustering by weights / max weight: equal weights give the unweighted value exactly
    assert m["clustering"] == pytest.approx(nx.average_clustering(g, weight=None))


def test_modularity_of_two_communities():
    g = nx.disjoint_union(nx.complete_graph(5), nx.complete_graph(5))
    g.add_edge(0, 5)
    adj = nx.to_numpy_array(g)
    q = graph.louvain_modularity(adj, seed=0)
    expected = nx.community.modularity(g, [set(range(5)), set(range(5, 10))])
    assert q == pytest.approx(expected)
    assert q > 0.4
    assert graph.louvain_modularity(adj, seed=0) == q  # seeded


def test_participation_hand_computed():
    adj = np.array([[0, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 1], [0, 0, 1, 0]], float)
    p = graph.participation(adj, ["x", "x", "y", "y"])
    # node 0: 1 edge to x, 1 to y -> 1 - (0.25 + 0.25) = 0.5; node 1: only x -> 0
    np.testing.assert_allclose(p, [0.5, 0.0, 0.5, 0.0])


def test_falff_and_band_ratio_on_known_frequencies():
    tr = 0.5
    t = np.arange(600) * tr
    slow = np.sin(2 * np.pi * 0.05 * t)
    fast = np.sin(2 * np.pi * 0.3 * t)
    f = ica.falff(np.stack([slow, fast]), tr)
    assert f[0] > 0.8 and f[1] < 0.1
    r = ica.band_ratio(np.stack([slow, fast]), tr)
    assert r[0] > 100 and r[1] < 0.01


def test_variability_of_smooth_vs_white_signals():
    rng = np.random.default_rng(0)
    white = rng.normal(size=2000)
    smooth = np.convolve(white, np.ones(20) / 20, mode="same")
    v = ica.variability(np.stack([white, smooth]))
    assert v[0] == pytest.approx(np.sqrt(2), rel=0.05) and v[1] < 0.5


def test_dual_regression_recovers_time_courses():
    rng = np.random.default_rng(2)
    maps = rng.normal(size=(10, 3))
    tc = rng.normal(size=(3, 50))
    est = ica.dual_regression(maps @ tc, maps)
    np.testing.assert_allclose(est, tc - tc.mean(1, keepdims=True), atol=1e-8)


def test_group_ica_recovers_spatial_sources():
    rng = np.random.default_rng(3)
    maps = rng.laplace(size=(300, 2))  # independent, non-Gaussian over ROIs
    series = [maps @ rng.normal(size=(2, 100)) for _ in range(3)]
    est = ica.group_ica(series, 2, seed=0)
    corr = np.abs(np.corrcoef(est.T, maps.T)[:2, 2:])
    assert (corr.max(axis=1) > 0.95).all()


def test_first_gradient_separates_two_blocks():
    rng = np.random.default_rng(4)
    n = 20
    fc = np.full((n, n), 0.05) + rng.normal(0, 0.01, (n, n))
    fc[:10, :10] = fc[10:, 10:] = 0.7
    fc = (fc + fc.T) / 2
    np.fill_diagonal(fc, 1)
    g = gradients.gradients(fc, 2)
    assert np.sign(g[:10, 0]).std() == 0 and np.sign(g[10:, 0]).std() == 0
    assert np.sign(g[0, 0]) != np.sign(g[15, 0])


def test_procrustes_undoes_a_rotation():
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(30, 3))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    np.testing.assert_allclose(gradients.procrustes_align(ref @ q, ref), ref, atol=1e-10)


# ---------------------------------------------------------------- captions


@pytest.mark.parametrize("name", [
    "fc.within.DefaultMode", "fc.between.DefaultMode~Frontoparietal", "fc.partial_within.Visual", "grad.G1.range",
    "grad.G2.variance", "grad.G1.Limbic", "ica.amplitude.IC0-Visual", "ica.variability.IC1-Limbic",
    "ica.band_ratio.IC2-Visual", "ica.fnc.IC0-Visual~IC3-Limbic", "falff.Somatomotor", "graph.strength.Visual",
    "graph.modularity", "graph.global_efficiency", "graph.clustering", "graph.participation"])
def test_caption_direction_matches_the_sign(name):
    fam, _ = captions.family_of(name)
    for variant in range(len(fam.templates)):
        up, down, flat = captions.phrase(name, 1.5, variant), captions.phrase(name, -1.5, variant), captions.phrase(name, 0.3, variant)
        assert fam.pos in up and fam.neg not in up
        assert fam.neg in down and fam.pos not in down
        assert fam.typ in flat and fam.pos not in flat and fam.neg not in flat
        assert "markedly" in captions.phrase(name, 2.5, variant) and "markedly" in captions.phrase(name, -2.5, variant)


def test_modularity_wording_is_not_inverted():
    high, low = captions.phrase("graph.modularity", 1.4, 0), captions.phrase("graph.modularity", -1.4, 0)
    assert "higher modularity" in high and "more segregated" in high and "reduced" not in high
    assert "lower modularity" in low and "less segregated" in low


def test_captions_are_seeded():
    z = {"fc.within.Visual": 1.5, "graph.modularity": -2.0, "falff.Limbic": 0.1, "grad.G1.range": 1.1, "graph.clustering": -0.4}
    a = captions.captions_for_scan("s1", z, seed=0)
    assert a == captions.captions_for_scan("s1", z, seed=0)
    assert a != captions.captions_for_scan("s1", z, seed=1)
    assert len(a) == 3 and all(len(r["descriptors"]) == 4 for r in a)
    with pytest.raises(KeyError, match="no caption template"):
        captions.phrase("mystery.metric", 1.0)


def test_stitch_and_fc_preservation():
    from fmrilm.features.connectivity import fc_preservation, stitch

    rng = np.random.default_rng(0)
    series = rng.normal(size=(5, 40))
    series[1] += series[0]  # a coupled pair
    windows = [(s, series[:, s : s + 16]) for s in (24, 0, 8, 16)]  # overlapping, out of order, the last one short of the end
    np.testing.assert_array_equal(stitch(windows), series)
    assert fc_preservation(series, series) == pytest.approx(1.0)
    assert fc_preservation(series, 2 * series + 1) == pytest.approx(1.0)  # scale and offset do not change FC
    assert fc_preservation(series, rng.normal(size=series.shape)) < 0.6
    assert fc_preservation(series, np.zeros_like(series)) == 0.0  # a decoder that outputs nothing keeps no coupling
    with pytest.raises(ValueError, match="at least one window"):
        stitch([])
