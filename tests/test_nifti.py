"""NIfTI ingestion with nilearn maskers on images made in the test (offline)."""

import nibabel as nib
import numpy as np
import pytest
import yaml

from fmrilm.data.ingest import IngestError, ingest_card
from fmrilm.data.table import find_datasets

SHAPE, T, TR = (6, 6, 4), 30, 1.5


def _regions():
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[:3, :, :] = 1
    labels[3:, :3, :] = 2
    labels[3:, 3:, :] = 3
    return labels


def _bold(seed):
    """A 4D image whose voxels in region r carry signal_r(t) (+ small voxel noise)."""
    rng = np.random.default_rng(seed)
    signals = rng.normal(0, 1, size=(3, T)).cumsum(axis=1) + 500
    labels = _regions()
    data = np.zeros(SHAPE + (T,), dtype=np.float32)
    for r in range(3):
        data[labels == r + 1] = signals[r] + rng.normal(0, 0.01, size=((labels == r + 1).sum(), T))
    return data, signals


def make_bids(root, n=3, maps=False, confounds=False):
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    signals = {}
    for i in range(1, n + 1):
        d = root / "fmriprep" / f"sub-{i:02d}" / "ses-1" / "func"
        d.mkdir(parents=True)
        data, signals[i] = _bold(i)
        img = nib.Nifti1Image(data, affine)
        img.header.set_zooms((3.0, 3.0, 3.0, TR))
        name = f"sub-{i:02d}_ses-1_task-rest_space-MNI_desc-preproc_bold.nii.gz"
        nib.save(img, d / name)
        if confounds:
            rng = np.random.default_rng(100 + i)
            cols = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "white_matter", "csf"]
            rows = ["\t".join(cols)] + ["\t".join(f"{v:.5f}" for v in rng.normal(size=len(cols))) for _ in range(T)]
            (d / f"sub-{i:02d}_ses-1_task-rest_desc-confounds_timeseries.tsv").write_text("\n".join(rows) + "\n")
            (d / f"sub-{i:02d}_ses-1_task-rest_desc-confounds_timeseries.json").write_text("{}")
    atlas_dir = root / "atlas"
    atlas_dir.mkdir()
    if maps:
        maps_data = np.stack([(_regions() == r + 1).astype(np.float32) for r in range(3)], axis=-1)
        nib.save(nib.Nifti1Image(maps_data, affine), atlas_dir / "maps.nii.gz")
    else:
        nib.save(nib.Nifti1Image(_regions(), affine), atlas_dir / "labels.nii.gz")
    (root / "participants.tsv").write_text("participant_id\tage\tsex\n" + "".join(f"sub-{i:02d}\t{30 + i}\t{'F' if i % 2 else 'M'}\n" for i in range(1, n + 1)))
    card = {
        "name": "niftitoy", "format": "nifti", "root": "fmriprep", "glob": "sub-*/ses-*/func/*_desc-preproc_bold.nii.gz",
        "atlas": {"name": "toy3", ("maps_img" if maps else "labels_img"): f"atlas/{'maps' if maps else 'labels'}.nii.gz", "labels": ["A", "B", "C"]},
        "masker": {"detrend": False},
        "phenotypes": {"file": "participants.tsv", "columns": {"age": "age", "sex": "sex"}},
    }
    if confounds:
        card["confounds"] = {"strategy": ["motion", "wm_csf"]}
    (root / "card.yaml").write_text(yaml.safe_dump(card))
    return str(root / "card.yaml"), signals


def _stored(out):
    import pyarrow.parquet as pq

    loc, m = find_datasets(out)[0]
    rows = []
    for p in [f"{loc.path}/{s['path']}" for s in m["shards"]]:
        rows += pq.read_table(p).to_pylist()
    return m, {r["subject_id"]: r for r in rows}


@pytest.mark.parametrize("maps", [False, True])
def test_nifti_labels_and_maps_extract_region_signals(tmp_path, maps):
    card, signals = make_bids(tmp_path, maps=maps)
    result = ingest_card(card, str(tmp_path / "store"), use_ray=False)
    m, rows = _stored(str(tmp_path / "store"))
    assert m["rows"] == 3 and m["tr"] == [TR] and m["n_rois"] == 3
    for sub, row in rows.items():
        ts = np.array(row["timeseries"]).reshape(3, T)
        np.testing.assert_allclose(ts, signals[int(sub)], atol=0.05)
        assert row["session"] == "1" and row["task"] == "rest"
    assert rows["01"]["sex"] == "F" and rows["02"]["age"] == 32
    assert result.written


def test_fmriprep_confounds_are_regressed(tmp_path):
    card, signals = make_bids(tmp_path, confounds=True)
    ingest_card(card, str(tmp_path / "store"), use_ray=False)
    _, rows = _stored(str(tmp_path / "store"))
    ts = np.array(rows["01"]["timeseries"]).reshape(3, T)
    assert not np.allclose(ts, signals[1], atol=0.05)
    conf = np.loadtxt(next((tmp_path / "fmriprep" / "sub-01").rglob("*confounds_timeseries.tsv")), skiprows=1)
    resid = ts - ts.mean(axis=1, keepdims=True)
    conf = conf - conf.mean(axis=0)
    # the cleaned series are orthogonal to every confound regressor
    assert np.abs(resid @ conf).max() / (np.linalg.norm(resid) * np.linalg.norm(conf, axis=0).max()) < 1e-3


def test_atlas_grid_mismatch_is_a_clear_error(tmp_path):
    card, _ = make_bids(tmp_path)
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.int16), np.eye(4)), tmp_path / "atlas" / "labels.nii.gz")
    with pytest.raises(IngestError, match=r"image grid \(6, 6, 4\) does not match atlas .* grid \(5, 5, 5\)"):
        ingest_card(card, str(tmp_path / "store"), use_ray=False)


def test_not_4d_is_a_clear_error(tmp_path):
    card, _ = make_bids(tmp_path, n=2)
    bad = next((tmp_path / "fmriprep" / "sub-02").rglob("*.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32), np.diag([3.0, 3.0, 3.0, 1.0])), bad)
    with pytest.raises(IngestError, match="expected a 4D image"):
        ingest_card(card, str(tmp_path / "store"), use_ray=False)


def test_mean_framewise_displacement_is_recorded_per_scan(tmp_path):
    from fmrilm.data.readers import confounds_uri

    assert confounds_uri("s3://b/sub-1/func/sub-1_task-rest_space-MNI_res-2_desc-preproc_bold.nii.gz") == \
        "s3://b/sub-1/func/sub-1_task-rest_desc-confounds_timeseries.tsv"
    card, _ = make_bids(tmp_path, confounds=True)
    for tsv in (tmp_path / "fmriprep").rglob("*confounds_timeseries.tsv"):
        lines = tsv.read_text().splitlines()
        fd = ["framewise_displacement", "n/a"] + [f"{0.1 * (k % 3):.1f}" for k in range(len(lines) - 2)]
        tsv.write_text("\n".join(f"{line}\t{v}" for line, v in zip(lines, fd)) + "\n")
    ingest_card(card, str(tmp_path / "store"), use_ray=False)
    _, rows = _stored(str(tmp_path / "store"))
    expected = np.mean([0.1 * (k % 3) for k in range(T - 1)])
    assert float(dict(rows["01"]["phenotypes"])["mean_fd"]) == pytest.approx(expected, rel=1e-4)


def make_cifti(root, n=3, grayordinates=12, t=30, label_grayordinates=None):
    """Dense time series (.dtseries.nii, TR 0.72 s) of ``n`` subjects and a 3-parcel .dlabel.nii."""
    from nibabel.cifti2 import cifti2_axes as ax

    models = ax.BrainModelAxis.from_mask(np.ones(grayordinates, bool), name="CortexLeft")
    series = {}
    for i in range(1, n + 1):
        d = root / "hcp" / f"sub-{i:02d}" / "func"
        d.mkdir(parents=True)
        series[i] = np.random.default_rng(i).normal(size=(t, grayordinates)).astype(np.float32)
        img = nib.Cifti2Image(series[i], header=(ax.SeriesAxis(start=0, step=0.72, size=t), models))
        img.to_filename(str(d / f"sub-{i:02d}_task-rest_space-fsLR_den-91k_bold.dtseries.nii"))
    g = label_grayordinates or grayordinates
    keys = np.array([[1] * 4 + [2] * 4 + [3] * (g - 9) + [0]], np.float32)
    table = {0: ("???", (0, 0, 0, 0)), 1: ("L_V1", (1, 0, 0, 1)), 2: ("L_MT", (0, 1, 0, 1)), 3: ("L_A1", (0, 0, 1, 1)), 4: ("L_unused", (1, 1, 1, 1))}
    label_models = ax.BrainModelAxis.from_mask(np.ones(g, bool), name="CortexLeft")
    nib.Cifti2Image(keys, header=(ax.LabelAxis(["parcels"], [table]), label_models)).to_filename(str(root / "parcels.dlabel.nii"))
    card = {"name": "ciftitoy", "format": "cifti", "root": "hcp", "glob": "sub-*/func/*_bold.dtseries.nii",
            "atlas": {"name": "toy-parcels", "dlabel": "parcels.dlabel.nii"}}
    (root / "cifti.yaml").write_text(yaml.safe_dump(card))
    return str(root / "cifti.yaml"), series, keys[0]


def test_cifti_dense_time_series_are_parcellated_with_a_dlabel(tmp_path):
    card, series, keys = make_cifti(tmp_path)
    ingest_card(card, str(tmp_path / "store"), use_ray=False)
    m, rows = _stored(str(tmp_path / "store"))
    assert m["rows"] == 3 and m["n_rois"] == 3 and m["roi_labels"] == ["L_V1", "L_MT", "L_A1"] and m["tr"] == [0.72]
    ts = np.array(rows["02"]["timeseries"]).reshape(3, 30)
    for j, key in enumerate((1, 2, 3)):  # each ROI is the mean over its parcel's grayordinates
        np.testing.assert_allclose(ts[j], series[2][:, keys == key].mean(1), rtol=1e-5)


def test_a_dlabel_on_other_grayordinates_is_a_clear_error(tmp_path):
    card, _, _ = make_cifti(tmp_path, label_grayordinates=14)
    with pytest.raises(IngestError, match=r"its 12 grayordinates differ from those of .*parcels.dlabel.nii \(14\)"):
        ingest_card(card, str(tmp_path / "store"), use_ray=False)
