"""Tokens -> pretrain -> instruct (LoRA, DeepSpeed on 2 Ray Train workers) -> eval on CPU: the
instruct stage trains on training subjects only and exports an adapter that reloads with the
in-training logits; the eval report has every paradigm and baseline column, for held-out
subjects and a held-out dataset; bad specs fail early. (Resuming by run name goes through the
same DeepSpeed loop as pretraining: tests/integration/test_lm_stage.py.)"""

import json
import os

import pandas as pd
import pytest
import torch

from fmrilm.data.ingest import ingest_synthetic
from fmrilm.data.pipeline import PipelineSpec
from fmrilm.data.synth import SynthParams
from fmrilm.models.tokenizer import TokenizerConfig
from fmrilm.train.optim import OptimSpec
from fmrilm.train.specs import RunSpec, ScalingSpec
from fmrilm.train.deepspeed import DeepSpeedSpec

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pretrained(ray_cluster, tmp_path_factory):
    """Two tiny synthetic datasets (one held out), captions, tokenizer, tokens, a pretrained LM."""
    from fmrilm.features.job import FeaturesSpec
    from fmrilm.features.job import run as features
    from fmrilm.tokens import TokenizeSpec
    from fmrilm.tokens import run as tokenize
    from fmrilm.train.lm import BackboneSpec, PretrainSpec
    from fmrilm.train.lm import run as pretrain
    from fmrilm.train.tokenizer import TokenizerStageSpec
    from fmrilm.train.tokenizer import run as train_tokenizer

    root = tmp_path_factory.mktemp("instruct")
    data = str(root / "datasets")
    ingest_synthetic(SynthParams(name="cohort", subjects=30, n_rois=8, n_networks=4, n_timepoints=96, seed=5, sex_effect=0.6), data)
    ingest_synthetic(SynthParams(name="other", subjects=6, n_rois=8, n_networks=4, n_timepoints=96, seed=9), data)
    features(FeaturesSpec(data={"root": data}, ica_components=3, captions_per_scan=1, plot=False, probe=False))
    runs = str(root / "runs")
    tok = train_tokenizer(TokenizerStageSpec(  # the held-out dataset never reaches training, the tokenizer included
        data=PipelineSpec(root=data, datasets=["cohort"], window=32, stride=32), model=TokenizerConfig(patch=16, width=16, heads=2, depth=1, code_dim=8, num_codes=16),
        train=OptimSpec(epochs=1, batch_size=8, max_steps=2, checkpoint_every=2),
        scaling=ScalingSpec(num_workers=1, cpus_per_worker=0.5), run=RunSpec(storage=runs, name="tok", logger="none")))
    tokenize(TokenizeSpec(tokenizer=tok["artifact"], data=PipelineSpec(root=data)))
    lm = pretrain(PretrainSpec(
        tokenizer=tok["artifact"], data={"root": data, "datasets": ["cohort"]}, backbone=BackboneSpec(source="tiny-gpt2", tiny_width=32), seq_len=64,
        deepspeed=DeepSpeedSpec(zero_stage=0, micro_batch_size=4), train=OptimSpec(epochs=1, lr=3e-3, warmup_steps=1, max_steps=4, log_every=2),
        scaling=ScalingSpec(num_workers=1, cpus_per_worker=0.5), run=RunSpec(storage=runs, name="lm", logger="none")))
    return {"root": root, "data": data, "runs": runs, "model": lm["model"]}


def _instruct_spec(p, name="instruct", **update):
    from fmrilm.data.instructions import InstructionSpec
    from fmrilm.train.instruct import InstructSpec
    from fmrilm.models.lora import LoraSpec

    spec = InstructSpec(model=p["model"], data={"root": p["data"], "datasets": ["cohort"]}, fmri_steps=2, seq_len=160,
                        number_loss=0.0,  # 2 LoRA epochs on a random tiny decoder: the total must fall; with the number loss it rose once (38.05 vs 38.01)
                        instructions=InstructionSpec(tasks={"sex": 1.0, "age_bin": 1.0, "age": 0.5, "description": 0.5}, fewshot_k=2),
                        lora=LoraSpec(enabled=True, r=4, alpha=8), deepspeed=DeepSpeedSpec(zero_stage=3, micro_batch_size=4),
                        train=OptimSpec(epochs=2, lr=3e-3, warmup_steps=1, log_every=2, checkpoint_every=100),
                        scaling=ScalingSpec(num_workers=2, cpus_per_worker=0.5), run=RunSpec(storage=p["runs"], name=name, logger="none"))
    return spec.model_copy(update=update)


def test_instruct_then_eval_report(pretrained):
    from fmrilm.eval.run import EvalSpec
    from fmrilm.eval.run import run as evaluate
    from fmrilm.train.kshot import KShotSpec
    from fmrilm.train.kshot import run as kshot
    from fmrilm.train.instruct import run as instruct
    from fmrilm.artifacts.lm import load_exported
    from fmrilm.models.fmri_lm import probe_logits

    result = instruct(_instruct_spec(pretrained))
    m = result["metrics"]
    assert m["loss"] < m["first_loss"]
    for task in ("sex", "age_bin", "age", "description"):
        assert m[f"loss/{task}"] > 0
    table = pd.read_parquet(result["instructions"])
    assert set(table["split"]) == {"train"} and set(table["paradigm"]) == {"single", "multi", "fewshot"}
    model, tok, meta = load_exported(result["model"])  # base export + adapter, gathered from ZeRO-3
    assert meta["layout"] == "adapter" and meta["base_model"] == pretrained["model"]
    probe = torch.load(os.path.join(result["model"], "probe.pt"), weights_only=False)
    torch.testing.assert_close(probe_logits(model, probe["inputs"]), probe["logits"], atol=1e-4, rtol=1e-4)

    shots = KShotSpec(model=pretrained["model"], data={"root": pretrained["data"], "datasets": ["cohort"]}, k=[1, 2], seeds=[0], steps=3,
                      fmri_steps=2, seq_len=160, run={"storage": pretrained["runs"], "name": "kshot"})
    tuned = kshot(shots)
    assert tuned["adapters"] == 6 and tuned["tuned"] == 6 and all(v > 0 for v in tuned["losses"].values())
    index = json.load(open(tuned["index"]))
    train_subjects = set(index["split"]["trained_subjects"])
    sex2 = next(a for a in index["adapters"] if a["task"] == "sex" and a["k"] == 2)
    assert len(sex2["scan_ids"]) == 4 and sex2["train_rows"] == 4  # 2 per class
    model, _, meta = load_exported(sex2["model"])  # an adapter export like instruct's, reloading with its own logits
    assert meta["layout"] == "adapter" and meta["stage"] == "kshot" and meta["base_model"] == pretrained["model"]
    probe = torch.load(os.path.join(sex2["model"], "probe.pt"), weights_only=False)
    torch.testing.assert_close(probe_logits(model, probe["inputs"]), probe["logits"], atol=1e-4, rtol=1e-4)
    assert kshot(shots)["kept"] == 6  # the same run again keeps every adapter
    vlms = _vlm_baselines(pretrained)
    spec = EvalSpec(model=result["model"], data={"root": pretrained["data"], "datasets": ["cohort"]}, heldout_datasets=["other"], fmri_steps=2,
                    seq_len=160, kshot=tuned["run"], bootstrap=50, shuffles=["rois"], vlm=vlms, arms=[result["model"]],
                    run={"storage": pretrained["runs"], "name": "eval"})
    report = evaluate(spec)
    methods = {(r["group"], r["task"], r["paradigm"], r["method"]) for r in report["results"]}
    for group in ("heldout_subjects", "heldout_dataset"):
        for task in ("sex", "age_bin", "age"):
            for paradigm in ("zero_shot", "in_context", "kshot_lora", "full"):
                assert (group, task, paradigm, "fmrilm") in methods
            assert (group, task, "baseline", "fc_linear") in methods and (group, task, "baseline", "descriptors_linear") in methods
            assert (group, task, "baseline", "majority" if task != "age" else "mean") in methods
    assert ("heldout_subjects", "sex", "baseline", "planted_pattern") in methods  # planted truth of the synthetic cohort
    assert ("heldout_subjects", "age", "baseline", "fc_linear_deconfounded") in methods  # two sites: site regressed out of FC
    sited = [(r["task"], r["method"], r["site"]) for r in report["by_site"] if r["group"] == "heldout_subjects"]
    assert {("sex", "fmrilm", "site0"), ("sex", "fc_linear", "site1")} <= set(sited)
    assert len(sited) == len(set(sited))  # one row per task, method and site (k-shot's FC on k scans was a second fc_linear)
    sex = next(r for r in report["results"] if r["task"] == "sex" and r["method"] == "fc_linear" and r["group"] == "heldout_subjects")
    assert {"accuracy", "balanced_accuracy", "auc"} <= set(sex["metrics"]) and "balanced_accuracy" in sex["ci"]
    age = next(r for r in report["results"] if r["task"] == "age" and r["paradigm"] == "full")
    assert {"mae", "pearson_r"} <= set(age["metrics"]) and 0 <= age["parse_rate"] <= 1
    files = report["files"]
    for name in ("report.json", "report.md", "predictions.json", "fewshot.png", "confusion.png", "age.png"):
        assert os.path.getsize(files[name]) > 0
    md = open(files["report.md"]).read()
    assert ("| task | metric | paradigm | fmrilm | majority/mean | best classical | fmrilm - best classical | fc_linear | "
            "fc_linear_whole_scan | descriptors_linear | planted_pattern |") in md
    assert "## Classical readers (heldout subjects)" in md
    best = next(r for r in report["results"] if r["task"] == "sex" and r["method"] == "best_classical" and r["group"] == "heldout_subjects")
    assert best["reader"].endswith("_linear") and best["cv_score"] is not None
    gap = next(r for r in report["results"] if r["task"] == "sex" and r["paradigm"] == "full" and r["group"] == "heldout_subjects")["vs"]
    assert gap["best_classical"]["ci"][0] <= gap["best_classical"]["gap"] <= gap["best_classical"]["ci"][1]
    assert 0 <= gap["best_classical"]["mcnemar_p"] <= 1 and "fc_linear" in gap
    assert "kshot_lora k=2" in md and "## heldout dataset" in md
    for group in ("heldout_subjects", "heldout_dataset"):  # each VLM on the same held-out scans, paired with fmrilm's full answers
        for family in ("llava", "idefics3"):
            rows = [r for r in report["results"] if r["group"] == group and r["paradigm"] == "vlm" and r["method"].startswith(f"vlm:{family}:")]
            assert {r["task"] for r in rows} == {"sex", "age"} and all({"full", "best_classical"} <= set(r["vs"]) for r in rows), rows
    vlm_age = next(r for r in report["results"] if r["paradigm"] == "vlm" and r["task"] == "age")
    assert {"mae", "pearson_r", "spread"} <= set(vlm_age["metrics"]) and 0 <= vlm_age["parse_rate"] <= 1
    assert "## Other arms: instruct exports and vision-language models" in md and "| heldout subjects | vlm | vlm:llava:vlm-llava |" in md
    said = json.load(open(files["predictions.json"]))  # the instruct export again as an arm: asked and calibrated as the full paradigm
    for task in ("sex", "age"):
        full, arm = ([p for p in said if p["task"] == task and p["group"] == "heldout_subjects" and (p["paradigm"], p["method"]) == key]
                     for key in (("full", "fmrilm"), ("arm", "arm:instruct")))
        assert len(full) == len(arm) == 1 and arm[0]["pred"] == full[0]["pred"], (task, full, arm)
    assert any(r["method"] == "arm:instruct" and "full" in r["vs"] for r in report["results"])
    shuffled = [r for r in report["results"] if r["paradigm"].startswith("full_shuffled_") and r["group"] == "heldout_subjects"]
    assert {(r["task"], r["paradigm"]) for r in shuffled} == {(t, "full_shuffled_rois") for t in ("sex", "age_bin", "age")}
    assert all("full" in r["vs"] for r in shuffled) and "## Codes shuffled at test time" in md
    scored = {sid for p in json.load(open(files["predictions.json"])) for sid in p["scan_id"]}
    assert train_subjects and scored and not scored & {s for a in index["adapters"] for s in a["scan_ids"]}  # never tuned on a scored scan
    saved = json.load(open(files["report.json"]))
    assert saved["groups"]["heldout_dataset"] == 6
    probed = {r["representation"] for r in saved["probes"] if r["group"] == "heldout_subjects" and r["task"] == "sex"}
    assert probed == {"fc (prompt time points)", "fc (whole scan)", "tokenizer: scan vector (encoder features)",
                      "tokenizer: codes: histogram", "tokenizer: codes: decoded FC", "LM answer state: pretrained",
                      "LM answer state: instruct"}
    assert "## Linear probes (heldout subjects" in md
    card = open(os.path.join(result["model"], "README.md")).read()  # the export's card, with the figures eval measured
    assert "Model Card for Model ID" not in card and "atlas `synthetic-8`, 8 ROIs" in card and "## Evaluation" in card
    assert "| sex | heldout_subjects | fmrilm (full) |" in card and "| sex | heldout_dataset | majority |" in card
    assert open(os.path.join(result["model"], "adapter", "README.md")).read().startswith("# fmrilm instruct export")


def _vlm_baselines(p) -> list[str]:
    """The poster's baseline in two families: tiny LLaVA on 2 workers (ZeRO-2) and tiny Idefics3
    (SmolVLM's family) on 1, a few LoRA steps each on the training scans as images; each export
    reloads with the trained logits; a run resumes by its name."""
    from fmrilm.artifacts import vlm as artifact
    from fmrilm.registry import load_job

    exports = []
    for family, workers, zero in (("llava", 2, 2), ("idefics3", 1, 0)):
        overrides = [f"model=tiny-{family}", f"data.root={p['data']}", "data.datasets=[cohort]", "render.size=16", "seq_len=96",
                     f"deepspeed.zero_stage={zero}", "deepspeed.micro_batch_size=4", "train.max_steps=3", "train.log_every=1",
                     "train.checkpoint_every=2", f"scaling.num_workers={workers}", f"run.storage={p['runs']}", f"run.name=vlm-{family}"]
        spec, run, _ = load_job("jobs/baseline_vlm.yaml", overrides)
        result = run(spec)
        assert result["metrics"]["step"] == 3 and result["task_rows"]["sex"] > 0 and result["task_rows"]["age"] > 0, result
        model, processor, meta = artifact.load(result["model"])  # checks the reload against the trained logits
        assert meta["family"] == family and meta["layout"] == "adapter" and set(meta["split"]["trained_subjects"])
        if family == "llava":  # the same run name resumes at its last checkpoint (the loop LM stages share)
            assert run(spec)["metrics"].get("resumed_from_step") == 3
        exports.append(result["model"])
    return exports


def test_bad_instruct_and_eval_specs_fail_early(pretrained):
    from fmrilm.eval.run import EvalSpec
    from fmrilm.eval.run import run as evaluate
    from fmrilm.models.fmri_lm import BackboneError
    from fmrilm.train.instruct import run as instruct
    from fmrilm.models.lora import LoraSpec

    with pytest.raises(FileNotFoundError, match="not an fmrilm model export"):
        instruct(_instruct_spec(pretrained, "bad1", model=str(pretrained["root"])))
    with pytest.raises(BackboneError, match="not modules of this gpt2 model"):
        instruct(_instruct_spec(pretrained, "bad2", lora=LoraSpec(enabled=True, target_modules=["q_proj"])))
    from fmrilm import config
    from fmrilm.errors import UserError

    with pytest.raises(UserError, match="heldout_datasets"):
        evaluate(EvalSpec(model=None, pretrained=pretrained["model"], data={"root": pretrained["data"]}, heldout_datasets=["nope"], kshot=None))
    with pytest.raises(UserError, match="no k-shot adapters .*run `fmrilm run jobs/kshot.yaml` first"):
        evaluate(EvalSpec(model=None, pretrained=pretrained["model"], data={"root": pretrained["data"]}, kshot=str(pretrained["root"] / "nope")))
    with pytest.raises(config.ConfigError, match="kshot: .*its own stage now"):  # the old in-eval k-shot section
        config.build(EvalSpec, {"kshot": {"k": [8]}})
    with pytest.raises(ValueError, match="unknown or no eval task"):
        EvalSpec(tasks=["description"])
    assert not (pretrained["root"] / "runs" / "bad1").exists() and not (pretrained["root"] / "runs" / "bad2").exists()


def test_lora_sweep_selects_on_validation_subjects(pretrained):
    """`fmrilm tune` over the instruct stage: trials hold a fraction of the training subjects out
    of tuning and report their instruction loss (val/loss) at checkpoints; ASHA and the best spec
    use it; the held-out test subjects never appear."""
    import yaml

    from fmrilm import config
    from fmrilm.tune.sweep import SweepSpec
    from fmrilm.tune.sweep import run as sweep

    base = _instruct_spec(pretrained, name="sweep-base", validation=0.25).model_dump(mode="json")
    base["deepspeed"]["zero_stage"] = 0
    base["scaling"]["num_workers"] = 1
    base["train"] |= {"epochs": 1, "checkpoint_every": 3}
    path = pretrained["root"] / "instruct_base.yaml"
    path.write_text(yaml.safe_dump(base))
    spec = config.build(SweepSpec, {"stage": "instruct", "base": str(path), "run": {"name": "lora", "storage": pretrained["runs"]},
                                    "space": {"lora.r": {"grid": [2]}}, "metric": "val/loss", "mode": "min"})
    result = sweep(spec)  # one trial: choosing among trials is covered by the tokenizer sweep
    table = result["table"]
    assert len(table) == 1 and table["error"].isna().all() and (table["val/loss"] > 0).all()
    best = config.load_yaml(result["best"])
    assert best["lora"]["r"] == 2 and best["validation"] == 0.25
    rows = pd.read_parquet(os.path.join(pretrained["runs"], "lora", "trials", f"lora-{table['trial'][0]}", "instructions.parquet"))
    train, val = (set(rows.loc[rows["split"] == s, "subject_id"]) for s in ("train", "tuning_validation"))
    assert train and val and not train & val and set(rows["split"]) == {"train", "tuning_validation"}
    subject_of = dict(zip(rows["scan_id"], rows["subject_id"]))
    support = {subject_of.get(scan) for ctx in rows.loc[rows["split"] == "tuning_validation", "context"] for scan in ctx}
    assert support and support <= train  # few-shot support of validation prompts: training subjects only


def test_full_fine_tuning_instruct_exports_a_full_model(pretrained):
    """lora.enabled=false trains every weight (head and norms included) and exports the whole
    model, which reloads with the in-training logits and still names its base export."""
    from fmrilm.train.instruct import run as instruct
    from fmrilm.artifacts.lm import load_exported
    from fmrilm.models.fmri_lm import probe_logits
    from fmrilm.models.lora import LoraSpec

    spec = _instruct_spec(pretrained, name="instruct-full", lora=LoraSpec(enabled=False), deepspeed=DeepSpeedSpec(zero_stage=2, micro_batch_size=4),
                          train=OptimSpec(epochs=1, lr=1e-3, warmup_steps=1, max_steps=3, log_every=1, checkpoint_every=100))
    result = instruct(spec)
    model, _, meta = load_exported(result["model"])
    assert meta["layout"] == "full" and meta["lora"] is False and meta["base_model"] == pretrained["model"]
    probe = torch.load(os.path.join(result["model"], "probe.pt"), weights_only=False)
    torch.testing.assert_close(probe_logits(model, probe["inputs"]), probe["logits"], atol=1e-4, rtol=1e-4)
