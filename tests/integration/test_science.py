"""The science job end to end on a tiny cohort: the real stages on Ray, the evaluation on the test
subjects with the codes shuffled, and one report with the targets and the ablation table. The
cohort carries a dynamics-only diagnosis, asked like sex and age. (Variants sharing one chain
are the quickstart's reuse by run-name tag, tested in tests/integration/test_quickstart.py; the
chains of the dynamics cohort and the fresh seed are the same chain on another cohort: their
plan, overrides, report sections and the exit code are in tests/test_science_job.py.)"""

import json

import pytest
import yaml
from typer.testing import CliRunner

pytestmark = pytest.mark.integration

TINY = {
    "kind": "science",
    "synth": {"name": "synthetic", "subjects": 24, "n_rois": 8, "n_networks": 4, "n_timepoints": 96, "seed": 4, "sex_effect": 0.6,
              "dynamic_effects": ["bursts", "lag"]},
    "split": {"fractions": {"train": 0.7, "test": 0.3}},
    "overrides": {
        "features": ["ica_components=3", "captions_per_scan=1", "plot=false", "probe=false"],
        "tokenizer": ["data.window=32", "data.stride=32", "model.num_codes=16", "model.width=16", "model.heads=2", "model.depth=1",
                      "model.code_dim=8", "train.epochs=1", "train.max_steps=2", "train.batch_size=8", "scaling.num_workers=1", "run.logger=none"],
        "pretrain": ["backbone.tiny_width=32", "seq_len=64", "deepspeed.zero_stage=0", "train.max_steps=2", "scaling.num_workers=1"],
        "instruct": ["seq_len=128", "fmri_steps=1", "train.max_steps=2", "scaling.num_workers=1", "lora.enabled=false",
                     "instructions.tasks={diagnosis: 1.0, sex: 1.0, age: 1.0}", "instructions.paradigms=[single]"],
        "kshot": ["seq_len=128", "fmri_steps=1", "tasks=[sex,age]", "k=[2]", "seeds=[0]", "steps=1"],
        "eval": ["seq_len=128", "test_splits=[test]", "tasks=[diagnosis,sex,age]", "bootstrap=20"],
    },
    "variants": {"scan_token": {"eval": ["shuffles=[time]"]}, "codes_only": {"pretrain": ["scan_token=false"]}},
    "select": ["scan_token"],
    "dynamics": None,
}


def test_science_job_runs_variants_and_writes_one_report(ray_cluster, tmp_path):
    from fmrilm.cli import app

    spec = tmp_path / "science.yaml"
    spec.write_text(yaml.safe_dump(TINY | {"storage": str(tmp_path / "science")}))
    r = CliRunner().invoke(app, ["run", str(spec)])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "science" / "science" / "science.json").read_text())
    assert [row["variant"] for row in report["ablation"]][:2] == ["scan_token", "scan_token, codes shuffled over time"]
    assert list(report["stages"]) == ["scan_token"] and "dynamics" not in report
    assert report["groups"]["heldout_subjects"] > 0 and {t["target"] for t in report["targets"]} >= {"sex balanced accuracy (full)", "age MAE (full)"}
    stages = {s["stage"]: s["status"] for s in report["stages"]["scan_token"]}
    assert stages == {s: "ran" for s in ("ingest", "features", "tokenizer", "tokenize", "pretrain", "instruct", "kshot", "eval")}
    runs = tmp_path / "science" / "runs"
    assert (runs / "pretrain-scan_token" / "model").is_dir() and (runs / "eval-scan_token" / "eval" / "report.md").is_file()
    assert not (runs / "pretrain-codes_only").exists()  # not selected
    md = (tmp_path / "science" / "science" / "science.md").read_text()
    assert "## Targets" in md and "| scan_token |" in md and "baseline: fc_linear" in md and "sex k-shot LoRA k=" in md
    assert [r["task"] for r in report["headline_rows"]] == ["diagnosis", "sex", "age"]  # the dynamics-only diagnosis, asked as well
    assert report["headline_rows"][0]["reader"] and report["headline_rows"][0]["gap"]["ci"]  # best classical and the paired gap
    assert "## fmrilm beside the best classical reader" in md and "| scan_token, codes shuffled over time |" in md
    with_scan = json.loads((runs / "pretrain-scan_token" / "model" / "fmri_lm.json").read_text())
    assert with_scan["scan_dim"] == 28
