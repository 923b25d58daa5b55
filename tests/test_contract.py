"""The input contract: what a tokenizer records of its training data, and the checks of a
dataset against it (atlas and ROI labels, ROI count, TR)."""

import pytest

from fmrilm.data.contract import ContractError, check_dataset, input_contract
from fmrilm.errors import UserError


def manifest(name="a", atlas="AAL2-94", n=4, labels=("L1", "L2", "L3", "L4"), tr=(0.72,)):
    return {"dataset": name, "version": f"v-{name}", "atlas": atlas, "n_rois": n, "roi_labels": list(labels), "tr": list(tr)}


def contract(*manifests, **kw):
    return input_contract(list(manifests) or [manifest()], window=32, stride=16, patch=16, normalise=True, target_tr=None, **kw)


def test_the_contract_records_atlas_labels_trs_windowing_and_versions():
    c = contract(manifest("a"), manifest("b", tr=(0.7201, 2.0)))
    assert c["atlas"] == "AAL2-94" and c["n_rois"] == 4 and c["roi_labels"] == ["L1", "L2", "L3", "L4"]
    assert c["tr"] == [0.72, 0.7201, 2.0] and c["datasets"] == {"a": "v-a", "b": "v-b"}
    assert (c["window"], c["stride"], c["patch"], c["normalise"], c["target_tr"]) == (32, 16, 16, True, None)


def test_training_on_two_atlases_is_refused_unless_mapped_by_position():
    other = manifest("b", atlas="DK-4", labels=("x", "y", "z", "w"))
    with pytest.raises(ContractError, match="'a' .*'AAL2-94'.* and 'b' .*'DK-4'.*data.atlas_mapping=position") as err:
        contract(manifest("a"), other)
    assert isinstance(err.value, UserError)
    assert contract(manifest("a"), other, atlas_mapping="position")["atlas"] == "AAL2-94"


def test_the_same_atlas_passes_and_another_is_refused_naming_both():
    c = contract()
    assert check_dataset(c, manifest("new"), "tokenizer T") == []
    with pytest.raises(ContractError, match=r"dataset 'new' is atlas 'AAL2-94' \(4 ROIs\) but tokenizer T was trained on atlas "
                                            r"'AAL2-94' \(4 ROIs\) \(other ROI names or order\)"):
        check_dataset(c, manifest("new", labels=("L2", "L1", "L3", "L4")), "tokenizer T")  # reordered ROIs
    with pytest.raises(ContractError, match="'DK-68' .68 ROIs. but tokenizer T was trained on atlas 'AAL2-94' .4 ROIs."):
        check_dataset(c, manifest("new", atlas="DK-68", n=68, labels=[f"r{i}" for i in range(68)]), "tokenizer T", "position")
    warnings = check_dataset(c, manifest("new", atlas="DK-4", labels=("x", "y", "z", "w")), "tokenizer T", "position")
    assert len(warnings) == 1 and "read by position" in warnings[0]


def test_an_unseen_tr_is_refused_unless_the_scans_are_resampled():
    c = contract()
    assert check_dataset(c, manifest("new", tr=(0.7205,)), "T") == []  # within 1 %
    with pytest.raises(ContractError, match=r"has TR \[2.0\] s but T was trained on TR \[0.72\] s without resampling"):
        check_dataset(c, manifest("new", tr=(2.0,)), "T")
    assert check_dataset(c, manifest("new", tr=(2.0,)), "T", target_tr=0.72) == []


def test_a_distribution_shift_is_a_warning_naming_the_statistic():
    import numpy as np

    from fmrilm.data.contract import shift_warnings, signal_summary

    rng = np.random.default_rng(0)
    smooth = lambda x: (x + np.roll(x, 1, -1) + np.roll(x, 2, -1)) / np.sqrt(3)  # noqa: E731 - lag-1 autocorrelation ~0.67
    train = smooth(rng.standard_normal((64, 5, 32)))
    c = contract() | {"signal": signal_summary(train)}
    assert shift_warnings(c, smooth(rng.standard_normal((32, 5, 32))), "same", "T") == []
    (warning,) = shift_warnings(c, rng.standard_normal((32, 5, 32)), "white", "T")  # no smoothing: lag-1 ~0
    assert warning.startswith("distribution shift: dataset 'white' has mean window lag1") and "bound 3" in warning
    assert shift_warnings(contract(), train, "x", "T") == []  # no signal summary recorded: nothing to compare


def test_check_datasets_skips_models_without_a_contract_and_collects_warnings():
    from fmrilm.data.contract import check_datasets

    other = manifest("b", atlas="DK-4", labels=("x", "y", "z", "w"))
    assert check_datasets(None, [other], "T") == []
    assert len(check_datasets(contract(), [manifest("a"), other], "T", "position")) == 1
    with pytest.raises(ContractError):
        check_datasets(contract(), [manifest("a"), other], "T")
