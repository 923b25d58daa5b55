"""One split for every stage: a cohort ingested through a dataset card whose split file puts
chosen subjects (ones the default hash split would train on) in test. The whole chain runs on it
(features -> tokenizer -> tokenize -> pretrain -> instruct -> eval) and no stage trains on them:
each export records the subjects that trained it, the instruction table and the baselines' fit
set leave them out, eval scores them as held out, and eval refuses a split that would score
subjects its models trained on."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import yaml

from fmrilm.data import synth
from fmrilm.data.splits import SplitError, assign_split
from fmrilm.data.synth import SynthParams

pytestmark = pytest.mark.integration
PARAMS = SynthParams(name="carded", subjects=16, n_rois=8, n_networks=4, n_timepoints=96, seed=4, sex_effect=0.6)


def _card_cohort(root) -> tuple[str, list[str]]:
    """The synthetic cohort written as per-scan arrays + phenotypes + a split file + a card; returns
    the card path and the subjects the split file holds out as test."""
    sources = synth.sources(PARAMS)
    rows, split_rows = [], []
    hashed_train = [s.subject_id for s in sources if assign_split(f"carded/{s.subject_id}") == "train"]
    chosen = sorted(hashed_train)[:3]  # the default policy would train on these
    for s in sources:
        d = root / "arrays" / f"sub-{s.subject_id}"
        d.mkdir(parents=True)
        np.save(d / f"sub-{s.subject_id}_task-rest_timeseries.npy",
                synth.simulate_scan(PARAMS, int(s.subject_id)).T)  # [time, rois] on disk
        rows.append({"participant_id": f"sub-{s.subject_id}", "sex": s.sex, "age": s.age, "site": s.site})
        split_rows.append({"subject_id": s.subject_id, "split": "test" if s.subject_id in chosen else
                           ("val" if len(split_rows) % 8 == 7 else "train")})
    pd.DataFrame(rows).to_csv(root / "participants.tsv", sep="\t", index=False)
    pd.DataFrame(split_rows).to_csv(root / "split.csv", index=False)
    extra = synth.manifest_extra(PARAMS)
    card = {"name": "carded", "format": "arrays", "root": "arrays", "glob": "sub-*/*_timeseries.npy", "tr": PARAMS.tr,
            "atlas": {"name": "synthetic-8", "labels": synth.roi_labels(PARAMS), "networks": extra["roi_networks"]},
            "phenotypes": {"file": "participants.tsv", "columns": {"sex": "sex", "age": "age", "site": "site"}},
            "split": {"method": "file", "file": "split.csv"}}
    (root / "carded.yaml").write_text(yaml.safe_dump(card))
    return str(root / "carded.yaml"), [f"carded/{c}" for c in chosen]


def test_no_stage_trains_on_the_card_split_test_subjects(ray_cluster, tmp_path):
    from fmrilm.data.ingest import ingest_card
    from fmrilm.eval.run import EvalSpec
    from fmrilm.eval.run import run as evaluate
    from fmrilm.quickstart import QuickstartSpec, run
    from tests.integration.test_quickstart import TINY

    card, chosen = _card_cohort(tmp_path / "cohort")
    store = tmp_path / "store"
    ingest_card(card, str(store / "datasets"))
    os.remove(tmp_path / "cohort" / "split.csv")  # the split is frozen in the manifest: no stage needs the file again
    pick = {"tokenizer": ["data.datasets=[carded]"], "tokenize": ["data.datasets=[carded]"], "pretrain": ["datasets=[carded]"],
            "instruct": ["datasets=[carded]"], "eval": ["datasets=[carded]"]}
    overrides = {stage: [*TINY["overrides"].get(stage, []), *pick.get(stage, [])] for stage in set(TINY["overrides"]) | set(pick)}
    spec = QuickstartSpec.model_validate({**TINY, "overrides": overrides, "storage": str(store),
                                          "stages": ["features", "tokenizer", "tokenize", "pretrain", "instruct", "eval"]})
    result = run(spec)
    assert [s["status"] for s in result["stages"]] == ["ran"] * 6

    def trained(path):
        return set(json.loads(open(path).read())["split"]["trained_subjects"])

    runs = store / "runs"
    features = json.loads(open(store / "datasets" / "carded" / "features" / "manifest.json").read())["summary"]["split"]
    records = {"features": set(features["trained_subjects"]), "tokenizer": trained(runs / "tokenizer" / "tokenizer" / "config.json"),
               "pretrain": trained(runs / "pretrain" / "model" / "fmri_lm.json"), "instruct": trained(runs / "instruct" / "model" / "fmri_lm.json")}
    for stage, subjects in records.items():
        assert subjects and not subjects & set(chosen), (stage, sorted(subjects & set(chosen)))
    instructions = pd.read_parquet(runs / "instruct" / "instructions.parquet")
    assert not set("carded/" + instructions["scan_id"].str.extract(r"sub-(\d+)")[0]) & set(chosen)
    predictions = json.loads(open(runs / "eval" / "eval" / "predictions.json").read())

    def scored(method):
        return {f"carded/{s.split('sub-')[1].split('_')[0]}" for p in predictions if p["method"] == method
                and p["group"] == "heldout_subjects" for s in p["scan_id"]}

    # the chosen subjects are scored as held out, by fmrilm and by the baselines (fitted on the train group only)
    assert set(chosen) <= scored("fmrilm") and set(chosen) <= scored("fc_linear")
    assert not {p["group"] for p in predictions} - {"heldout_subjects", "heldout_dataset"}

    # a split that would score subjects the models trained on is refused before anything is scored
    train_subject = sorted(records["pretrain"])[0].split("/")[1]
    bad = pd.DataFrame({"subject_id": [train_subject], "split": ["test"]})
    bad.to_csv(tmp_path / "leaky.csv", index=False)
    with pytest.raises(SplitError, match=r"that trained the instruct export .* would be scored as held out"):
        evaluate(EvalSpec(data=str(store / "datasets"), datasets=["carded"], model=str(runs / "instruct" / "model"), paradigms=["zero_shot"],
                          split={"method": "file", "file": str(tmp_path / "leaky.csv")}, run={"storage": str(runs), "name": "leaky"}))
