import json

import pytest
from typer.testing import CliRunner

from fmrilm.cli import app

runner = CliRunner()


def test_synth_then_inspect_json(tmp_path):
    out = str(tmp_path / "store")
    r = runner.invoke(app, ["data", "synth", "--subjects", "10", "--rois", "14", "--timepoints", "40", "--out", out, "--no-ray"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["data", "inspect", out, "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert {"rows", "subjects", "n_rois", "datasets", "atlas", "splits", "phenotype_coverage"} <= set(summary)
    assert summary["rows"] == 10 and summary["subjects"] == 10 and summary["n_rois"] == [14]
    assert sum(v["subjects"] for v in summary["splits"].values()) == 10
    assert summary["phenotype_coverage"]["sex"] == 1.0 and summary["phenotype_coverage"]["diagnosis"] == 0.0
    r = runner.invoke(app, ["data", "inspect", out])
    assert r.exit_code == 0 and "subject-level splits" in r.stdout


def test_user_errors_exit_2_with_a_message(tmp_path):
    r = runner.invoke(app, ["data", "inspect", str(tmp_path)])
    assert r.exit_code == 2 and "no dataset under" in r.output
    r = runner.invoke(app, ["data", "sample", "other", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "unknown sample" in r.output
    spec = tmp_path / "job.yaml"
    # a sweep checks its stage's inputs before any trial starts (base, metric, mode follow the stage)
    spec.write_text(f"kind: sweep\nstage: instruct\noverrides: [model={tmp_path}/none, validation=0.2]\nspace: {{lora.r: {{grid: [4, 8]}}}}\n")
    r = runner.invoke(app, ["tune", str(spec), f"run.storage={tmp_path}/runs"])
    assert r.exit_code == 2 and "(no fmri_lm.json)" in r.output
    r = runner.invoke(app, ["tune", str(spec), f"run.storage={tmp_path}/runs", "overrides=[]"])
    assert r.exit_code == 2 and "an instruct sweep on val/loss needs validation subjects" in r.output
    spec.write_text(f"kind: sweep\noverrides: [data.root={tmp_path}/nodata]\nspace: {{model.num_codes: {{grid: [8]}}}}\n")
    r = runner.invoke(app, ["tune", str(spec), f"run.storage={tmp_path}/runs"])
    assert r.exit_code == 2 and "no dataset under" in r.output
    assert not (tmp_path / "runs").exists()
    spec.write_text("kind: sweep\n")
    r = runner.invoke(app, ["run", str(spec)])
    assert r.exit_code == 2 and "space: Field required" in r.output
    spec.write_text(f"kind: instruct\nmodel: {tmp_path}/none\n")
    r = runner.invoke(app, ["lm", "instruct", str(spec)])
    assert r.exit_code == 2 and "(no fmri_lm.json)" in r.output
    spec.write_text(f"kind: eval\nmodel: null\npretrained: {tmp_path}/none\n")
    r = runner.invoke(app, ["eval", str(spec)])
    assert r.exit_code == 2 and "(no fmri_lm.json)" in r.output
    spec.write_text(f"kind: pretrain\ntokenizer: {tmp_path}/none\n")
    r = runner.invoke(app, ["lm", "pretrain", str(spec)])
    assert r.exit_code == 2 and "no tokenizer artifact" in r.output
    r = runner.invoke(app, ["tokenize", str(spec)])
    assert r.exit_code == 2 and "this command runs 'tokenize' specs" in r.output
    spec.write_text("backbone: {source: ./no/such/folder}\n")
    r = runner.invoke(app, ["lm", "pretrain", str(spec)])
    assert r.exit_code == 2 and "not a Hugging Face model" in r.output
    spec.write_text("kind: quickstart\nsynth: {subjects: 0}\n")
    r = runner.invoke(app, ["run", str(spec)])
    assert r.exit_code == 2 and "synth.subjects" in r.output


def test_quickstart_runs_and_reuses_finished_work(tmp_path):
    args = ["quickstart", f"storage={tmp_path}", "synth.subjects=6", "synth.n_timepoints=40", "use_ray=false", "stages=[ingest]",
            "--spec", "jobs/quickstart.yaml"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "18 scans" in r.stdout  # 6 synthetic + 7 HCP + 5 second site
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "unchanged" in r.output
    r = runner.invoke(app, [*args[:-2], "stages=[ingest,pretraining]"])
    assert r.exit_code == 2 and "stages.1" in r.output
    # every stage's spec is validated before the first stage runs
    r = runner.invoke(app, [*args, f"storage={tmp_path / 'fresh'}", "stages=[ingest,features,tokenizer]", "overrides.tokenizer=[model.bogus=1]"])
    assert r.exit_code == 2 and "model.bogus: unknown key" in r.output
    assert not (tmp_path / "fresh").exists()


def test_a_bad_quickstart_override_is_one_line_not_a_traceback():
    r = CliRunner().invoke(app, ["quickstart", "overrides.eval=[paradigms=[a,b],x]"])
    assert r.exit_code == 2 and "is not valid YAML" in r.output and "Traceback" not in r.output, r.output


def test_a_quickstart_specs_entry_is_not_an_unknown_stage():
    from fmrilm.quickstart import QuickstartSpec, check

    check(QuickstartSpec(specs={"features": "jobs/features.yaml"}, stages=["ingest", "features"]))  # used to say "unknown stage(s)"
    with pytest.raises(Exception, match=r"unknown stage\(s\) \['featurs'\]"):
        check(QuickstartSpec(overrides={"featurs": ["plot=false"]}, stages=["ingest"]))


def test_a_user_error_wrapped_by_ray_shows_its_own_line():
    """A dataset deleted mid-training: the error line was Ray's SplitCoordinator report (Ray makes its
    task error an instance of the cause's class, so the wrapper itself looked like ours)."""
    from ray.exceptions import RayTaskError

    from fmrilm.data.table import ManifestError
    from fmrilm.errors import user_error_in

    cause = ManifestError("/data/cohort/v-1/part-00003.parquet is gone: re-ingest the dataset")
    wrapped = RayTaskError("SplitCoordinator.start_epoch", "Traceback (most recent call last):\n  ...\n" * 50, cause).as_instanceof_cause()
    outer = RuntimeError("Training failed due to worker errors")
    outer.__cause__ = wrapped
    found = user_error_in(outer)
    assert found is cause and str(found).count("\n") == 0
