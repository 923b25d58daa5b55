"""The pure signal helpers (scaling, resampling, windowing) and splits."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fmrilm.data import signal
from fmrilm.data.splits import SplitError, SplitPolicy, assign_split, load_split_file, split_of


def test_robust_scale_is_x_minus_median_over_iqr():
    x = np.array([[1.0, 2.0, 3.0, 4.0, 100.0], [5.0, 5.0, 5.0, 5.0, 5.0]])
    out = signal.robust_scale(x)
    med, iqr = 3.0, 4.0 - 2.0
    np.testing.assert_allclose(out[0], (x[0] - med) / iqr)
    assert not np.allclose(out[0], x[0] - med / iqr)  # BrainLM's precedence bug
    np.testing.assert_array_equal(out[1], 0.0)  # zero IQR: centred, not divided by zero
    assert out.dtype == np.float32


@settings(max_examples=60, deadline=None)
@given(t=st.integers(1, 300), window=st.integers(2, 64), stride=st.integers(1, 64), rois=st.integers(1, 5))
def test_windows_shapes_and_content(t, window, stride, rois):
    ts = np.arange(rois * t, dtype=np.float32).reshape(rois, t)
    w = signal.windows(ts, window, stride)
    n = signal.n_windows(t, window, stride)
    assert w.shape == (n, rois, window)
    assert n == (0 if t < window else len(range(0, t - window + 1, stride)))
    for k in range(n):
        np.testing.assert_array_equal(w[k], ts[:, k * stride : k * stride + window])


def test_resample_length_and_frequency():
    tr, target = 0.72, 2.0
    t = np.arange(1200) * tr
    ts = np.sin(2 * np.pi * 0.05 * t)[None]  # 0.05 Hz, below the new Nyquist (0.25 Hz)
    out = signal.resample(ts, tr, target)
    assert out.shape[1] == signal.resampled_length(1200, tr, target)
    assert abs(out.shape[1] - 1200 * tr / target) <= 1
    t2 = np.arange(out.shape[1]) * target
    ref = np.sin(2 * np.pi * 0.05 * t2)
    core = slice(20, -20)
    assert np.corrcoef(out[0, core], ref[core])[0, 1] > 0.99
    assert signal.resample(ts, 2.0, 2.0) is ts


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=60, unique=True), seed=st.integers(0, 5))
def test_split_is_per_subject_and_independent_of_the_others(ids, seed):
    policy = SplitPolicy(seed=seed)
    scans = [(s, "ds") for s in ids for _ in range(3)]  # three scans per subject
    splits = split_of(policy, np.array([s for s, _ in scans], dtype=object), np.array([d for _, d in scans], dtype=object))
    by_subject = {}
    for (s, _), sp in zip(scans, splits):
        by_subject.setdefault(s, set()).add(sp)
    assert all(len(v) == 1 for v in by_subject.values())  # no subject in two splits
    alone = split_of(policy, np.array(ids[:1], dtype=object), np.array(["ds"], dtype=object))
    assert alone[0] == next(iter(by_subject[ids[0]]))  # same answer whoever else exists


def test_split_fractions_are_respected_roughly():
    counts = {"train": 0, "val": 0, "test": 0}
    for i in range(4000):
        counts[assign_split(str(i), 1)] += 1
    assert abs(counts["train"] / 4000 - 0.8) < 0.03 and abs(counts["val"] / 4000 - 0.1) < 0.02


def test_split_policy_validation():
    with pytest.raises(ValueError, match="sum to 1"):
        SplitPolicy(fractions={"train": 0.5, "test": 0.2})
    with pytest.raises(ValueError, match="needs split.file"):
        SplitPolicy(method="file")


def test_split_file(tmp_path):
    f = tmp_path / "splits.csv"
    f.write_text("subject_id,split\n01,train\n02,test\n")
    mapping = load_split_file(str(f))
    out = split_of(SplitPolicy(method="file", file=str(f)), np.array(["01", "02", "03"], dtype=object), np.array(["d"] * 3, dtype=object), mapping)
    assert list(out) == ["train", "test", "unassigned"]
    f.write_text("subject_id,split\n01,train\n01,test\n")
    with pytest.raises(SplitError, match="more than once"):
        load_split_file(str(f))
    f.write_text("subject,split\n01,train\n")
    with pytest.raises(SplitError, match="lacks column"):
        load_split_file(str(f))
