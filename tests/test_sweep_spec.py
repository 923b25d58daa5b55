"""Sweep specs without a cluster: search-space validation, trial specs, concurrency; and the
driver-side path fixing every stage applies before its spec reaches Ray workers."""

import os

import pytest
import yaml

from fmrilm import config
from fmrilm.config import ConfigError
from fmrilm.train.specs import worker_spec
from fmrilm.tune.sweep import Dimension, SweepSpec, check, concurrency, trial_spec


def _spec(tmp_path, **extra):
    base = tmp_path / "tok.yaml"
    base.write_text(yaml.safe_dump({"kind": "tokenizer", "data": {"root": "./somewhere/datasets"},
                                    "scaling": {"num_workers": 2, "cpus_per_worker": 0.5}}))
    return config.build(SweepSpec, {"base": str(base), "space": {"model.num_codes": {"grid": [64, 256]}}, "run": {"storage": str(tmp_path)}} | extra)


def test_dimensions_validate():
    assert Dimension(grid=[1, 2]).sample_value() == 1 and Dimension(loguniform=(1e-4, 1e-2)).sample_value() == 1e-4
    for bad, msg in (({}, "exactly one"), ({"grid": []}, "empty grid"), ({"uniform": (2, 1)}, "low < high"),
                     ({"loguniform": (0, 1)}, "low > 0"), ({"grid": [1], "choice": [2]}, "exactly one")):
        with pytest.raises(ValueError, match=msg):
            Dimension(**bad)


def test_trial_specs_and_early_failures(tmp_path):
    spec = _spec(tmp_path)
    base = check(spec)
    trial = trial_spec(spec, {"model.num_codes": 256}, "t1", base)
    assert trial.model.num_codes == 256 and trial.run.name == "t1"
    assert trial.data.root == os.path.abspath("./somewhere/datasets")  # trials run in their own folders
    assert trial.train.log_every == trial.train.checkpoint_every  # val/r2 in every report, for ASHA
    assert trial.run.storage == os.path.join(str(tmp_path), "sweep", "trials")
    with pytest.raises(ConfigError, match="model.codez: unknown key"):
        check(_spec(tmp_path, space={"model.codez": {"grid": [1]}}))
    with pytest.raises(ConfigError, match="greater than or equal to 2"):
        check(_spec(tmp_path, space={"model.num_codes": {"grid": [64, 1]}}))
    with pytest.raises(ConfigError, match="space is empty"):
        _spec(tmp_path, space={})
    with pytest.raises(ValueError, match="cannot be swept; sweepable: \\['instruct', 'tokenizer'\\]"):
        _spec(tmp_path, stage="pretrain")


def test_instruct_sweeps_select_on_validation_subjects(tmp_path):
    base = tmp_path / "instruct.yaml"
    base.write_text(yaml.safe_dump({"kind": "instruct", "model": "./runs/pretrain/model", "train": {"checkpoint_every": 7}}))
    spec = config.build(SweepSpec, {"stage": "instruct", "base": str(base), "metric": "val/loss", "mode": "min", "run": {"storage": str(tmp_path)},
                                    "space": {"lora.r": {"grid": [4, 64]}, "train.lr": {"loguniform": [1e-4, 1e-3]}}})
    with pytest.raises(ConfigError, match="needs validation subjects: add validation=0.2"):
        check(spec)
    spec = spec.model_copy(update={"overrides": ["validation=0.2"]})
    trial = trial_spec(spec, {"lora.r": 64, "train.lr": 3e-4}, "t2", check(spec))
    assert trial.lora.r == 64 and trial.train.lr == 3e-4 and trial.validation == 0.2
    assert trial.train.log_every == 7 and trial.model == os.path.abspath("./runs/pretrain/model")
    with pytest.raises(ConfigError, match="lora.rank: unknown key"):
        check(spec.model_copy(update={"space": {"lora.rank": Dimension(grid=[4])}}))


def test_concurrency_leaves_room_for_ray_data(tmp_path):
    spec = _spec(tmp_path)
    base = check(spec)
    assert concurrency(spec, 4, base) == (2, pytest.approx(1.05))  # (4 - 1) // 1.05
    assert concurrency(spec, 2, base)[0] == 1  # never zero
    assert concurrency(_spec(tmp_path, max_concurrent_trials=1), 16, base)[0] == 1


def test_worker_spec_makes_local_paths_absolute(tmp_path, monkeypatch):
    from fmrilm.train.lm import BackboneSpec, PretrainSpec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "gpt2").mkdir(parents=True)
    spec = PretrainSpec(tokenizer="./runs/tok/tokenizer", data={"root": "s3://bucket/datasets"}, backbone=BackboneSpec(source="models/gpt2"))
    d = worker_spec(spec)
    assert d["tokenizer"] == str(tmp_path / "runs/tok/tokenizer") and d["data"]["root"] == "s3://bucket/datasets"
    assert d["backbone"]["source"] == str(tmp_path / "models/gpt2") and d["run"]["storage"] == str(tmp_path / "fmrilm-data/runs")
    for keep in ("tiny-gpt2", "Qwen/Qwen3-0.6B"):
        assert worker_spec(spec.model_copy(update={"backbone": BackboneSpec(source=keep)}))["backbone"]["source"] == keep


def test_base_metric_and_mode_follow_the_stage():
    space = {"lora.r": {"grid": [4]}}
    spec = SweepSpec(stage="instruct", space=space, usage_floor=None)
    assert (spec.base, spec.metric, spec.mode, spec.usage_floor) == ("jobs/instruct.yaml", "val/loss", "min", None)
    spec = SweepSpec(space={"model.num_codes": {"grid": [8]}})
    assert (spec.base, spec.metric, spec.mode) == ("jobs/tokenizer.yaml", "val/r2", "max")
    assert SweepSpec(space=space, metric="val/mse").mode == "min"
    assert SweepSpec(space=space, metric="val/mse", mode="max", base="b.yaml").model_dump()["mode"] == "max"


def test_a_tokenizer_sweep_on_a_validation_metric_needs_validation_windows(tmp_path):
    """Without one 'val' window no trial could report val/r2 (Tune stopped the sweep with a
    traceback): refused before any trial, saying what to do."""
    from fmrilm.data.ingest import ingest_synthetic
    from fmrilm.data.synth import SynthParams
    from fmrilm.tune.sweep import check_inputs

    data = str(tmp_path / "datasets")
    ingest_synthetic(SynthParams(name="synthetic", subjects=16, n_rois=8, n_networks=4, n_timepoints=64, seed=4), data, use_ray=False)
    base = tmp_path / "tok.yaml"
    base.write_text(yaml.safe_dump({"kind": "tokenizer", "data": {"root": data}, "alignment": {"domain_weight": 0.0}}))
    spec = config.build(SweepSpec, {"base": str(base), "space": {"model.num_codes": {"grid": [8, 16]}}, "run": {"storage": str(tmp_path)}})
    with pytest.raises(ConfigError, match="needs validation windows.*metric=loss"):
        check_inputs(spec, check(spec))
    check_inputs(spec.model_copy(update={"metric": "loss", "mode": "min"}), check(spec))  # a training metric needs none
