"""The LM stage on Ray Train + DeepSpeed (2 CPU workers, gloo): ZeRO-2 and ZeRO-3, with and
without LoRA; losses fall; a fault then a resume by run name (ZeRO-3 + LoRA); export reloaded with plain
transformers (+ peft) gives the in-training logits; bad specs fail before any worker starts."""

import os

import pytest
import torch

from fmrilm.data.ingest import ingest_synthetic
from fmrilm.data.pipeline import PipelineSpec
from fmrilm.data.synth import SynthParams
from fmrilm.models.fmri_lm import BackboneError
from fmrilm.models.tokenizer import TokenizerConfig
from fmrilm.train.optim import OptimSpec
from fmrilm.train.specs import RunSpec, ScalingSpec
from fmrilm.train.deepspeed import DeepSpeedSpec
from fmrilm.artifacts.lm import load_exported
from fmrilm.models.lora import LoraSpec
from fmrilm.train.lm import BackboneSpec, PretrainSpec, run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lm_inputs(ray_cluster, tmp_path_factory):
    """A synthetic cohort with captions, a (briefly) trained tokenizer aligned against the tiny
    LM's own input embeddings (so its codebook can be mapped into them), and its tokens table."""
    from fmrilm.models.fmri_lm import load_backbone
    from fmrilm.features.job import FeaturesSpec
    from fmrilm.features.job import run as features
    from fmrilm.models.alignment import AlignmentConfig
    from fmrilm.tokens import TokenizeSpec
    from fmrilm.tokens import run as tokenize
    from fmrilm.train.tokenizer import TokenizerStageSpec
    from fmrilm.train.tokenizer import run as train_tokenizer

    root = tmp_path_factory.mktemp("lm")
    data = str(root / "datasets")
    ingest_synthetic(SynthParams(name="lmtest", subjects=12, n_rois=8, n_networks=4, n_timepoints=96, seed=3), data)
    features(FeaturesSpec(data={"root": data}, ica_components=3, captions_per_scan=2, plot=False, probe=False))
    lm, lm_tok, _ = load_backbone("tiny-gpt2", tiny_width=32)
    lm.save_pretrained(root / "tiny-gpt2")
    lm_tok.save_pretrained(root / "tiny-gpt2")
    tok = train_tokenizer(TokenizerStageSpec(
        data=PipelineSpec(root=data, window=32, stride=32), model=TokenizerConfig(patch=16, width=16, heads=2, depth=1, code_dim=8, num_codes=16),
        alignment=AlignmentConfig(domain_weight=0.5, text_source=str(root / "tiny-gpt2")), train=OptimSpec(epochs=1, batch_size=8, max_steps=3, checkpoint_every=3),
        scaling=ScalingSpec(num_workers=1, cpus_per_worker=0.5), run=RunSpec(storage=str(root / "runs"), name="tok", logger="none")))
    tokenize(TokenizeSpec(tokenizer=tok["artifact"], data=PipelineSpec(root=data), features=True))
    return {"root": root, "data": data, "tokenizer": tok["artifact"]}


def _spec(inputs, name, zero=2, lora=False, source="tiny-gpt2", input_mode="tokens", **train):
    return PretrainSpec(input_mode=input_mode,
        tokenizer=inputs["tokenizer"], data={"root": inputs["data"]}, backbone=BackboneSpec(source=source, tiny_width=32),
        seq_len=64, lora=LoraSpec(enabled=lora, r=4, alpha=8),
        deepspeed=DeepSpeedSpec(zero_stage=zero, micro_batch_size=2),
        train=OptimSpec(**({"epochs": 2, "lr": 3e-3, "warmup_steps": 1, "checkpoint_every": 100, "log_every": 2} | train)),
        scaling=ScalingSpec(num_workers=2, cpus_per_worker=0.5),
        run=RunSpec(storage=str(inputs["root"] / "runs"), name=name, logger="none"))


def _check_export(result, tol=1e-4, trained_effect=None):
    """Reload an export and compare its logits with the in-training probe. A deep model's logits
    move by float rounding (a merged adapter sums W + BA before the matmul; another CPU's kernels
    reduce in another order), so callers checking a 30-layer model pass a tolerance for that and
    ``trained_effect``: the least the adapter must move the logits, so that the tolerance could
    not hide an export without its trained weights."""
    model, tok, meta = load_exported(result["model"])
    from fmrilm.models.fmri_lm import probe_logits

    probe = torch.load(os.path.join(result["model"], "probe.pt"), weights_only=False)
    torch.testing.assert_close(probe_logits(model, probe["inputs"]), probe["logits"], atol=tol, rtol=tol)
    assert meta["vocab"]["num_codes"] == 16 and tok.convert_tokens_to_ids("<fmri_15>") == meta["vocab"]["first_code_id"] + 15
    if trained_effect is not None:
        with getattr(model, "lm", model).disable_adapter():  # the LM inside an FMRIInputLM
            moved = (probe_logits(model, probe["inputs"]) - probe["logits"]).abs().max().item()
        assert moved > trained_effect, moved
    return meta


@pytest.mark.parametrize("zero,lora,source,mode", [(2, True, "tiny-qwen", "features"), (3, False, "tiny-gpt2", "tokens")])
def test_two_workers_train_export_and_reload(lm_inputs, zero, lora, source, mode):
    result = run(_spec(lm_inputs, f"lm-z{zero}-{int(lora)}-{mode}", zero=zero, lora=lora, source=source, input_mode=mode, epochs=3))
    m = result["metrics"]
    assert m["loss"] < m["first_loss"]  # the loss falls over a few steps
    assert result["examples"] > 0 and all(v > 0 for v in result["objective_examples"].values())
    for k in ("loss/fmri_fmri", "loss/fmri_text", "loss/text_text"):
        assert k in m and m[k] > 0
    assert m["code_init"] == "linear-map" and m["pretrained_backbone"] is False  # codebook mapped into the 32-wide LM space
    meta = _check_export(result)
    assert meta["layout"] == ("base+adapter" if lora else "full") and meta["input_mode"] == mode
    if lora:  # merged into a plain model: same logits without peft
        from fmrilm.artifacts.lm import merge_adapter

        merged = merge_adapter(result["model"], result["model"] + "-merged")
        assert _check_export({"model": merged})["layout"] == "full"


def test_zero3_lora_fault_then_resume_by_run_name(lm_inputs, monkeypatch):
    """ZeRO-3 + LoRA (tiny-llama): a fault after the first checkpoint, the same spec resumes from
    the sharded checkpoint and exports an adapter that reloads with the in-training logits."""
    import glob
    import tempfile

    def base_copies():  # what LoRA runs stage in the temp folder; none may outlive its run
        return set(glob.glob(os.path.join(tempfile.gettempdir(), "fmrilm-base-*")))

    before = base_copies()
    spec = _spec(lm_inputs, "lm-resume", zero=3, lora=True, source="tiny-llama", checkpoint_every=2, epochs=3)
    monkeypatch.setenv("FMRILM_FAULT_STEP", "3")
    with pytest.raises(Exception, match="injected fault at step 3"):
        run(spec)
    monkeypatch.delenv("FMRILM_FAULT_STEP")
    result = run(spec)
    m = result["metrics"]
    assert m["resumed_from_step"] == 2 and m["step"] > 3
    assert _check_export(result)["layout"] == "base+adapter"
    assert base_copies() <= before  # neither the failed run nor the finished one left its base copy


def test_bad_specs_fail_before_workers_start(lm_inputs):
    with pytest.raises(BackboneError, match="no config.json"):
        run(_spec(lm_inputs, "bad1", source=str(lm_inputs["root"])))
    with pytest.raises(BackboneError, match="not modules of this gpt2 model"):
        run(_spec(lm_inputs, "bad2", lora=True).model_copy(update={"lora": LoraSpec(enabled=True, target_modules=["q_proj"])}))
    with pytest.raises(BackboneError, match="exceeds the backbone's maximum positions"):
        run(_spec(lm_inputs, "bad3").model_copy(update={"seq_len": 5000}))
    assert not (lm_inputs["root"] / "runs" / "bad1").exists() and not (lm_inputs["root"] / "runs" / "bad2").exists()


def test_smollm2_lora_zero2_pretrain_export_reload_and_merge(lm_inputs, smollm2_cache):
    """The real pretrained backbone through the LM stage: a few LoRA steps under ZeRO-2 on two
    workers (converted once per node into the shared cache), the export reloads with the
    in-training logits, and `fmrilm lm merge` folds the adapter into a plain model."""
    from typer.testing import CliRunner

    from fmrilm.cli import app

    spec = _spec(lm_inputs, "lm-smollm2", zero=2, lora=True, source="smollm2-135m", max_steps=2)
    spec = spec.model_copy(update={"backbone": BackboneSpec(source="smollm2-135m", cache_dir=smollm2_cache)})
    result = run(spec)
    m = result["metrics"]
    assert m["pretrained_backbone"] is True and m["step"] == 2
    meta = _check_export(result, tol=2e-2, trained_effect=1.0)  # 30 layers of rounding; the adapter moves logits by ~18
    assert meta["layout"] == "base+adapter" and meta["backbone"]["family"] == "llama"
    merged = result["model"] + "-merged"
    r = CliRunner().invoke(app, ["lm", "merge", result["model"], merged])
    assert r.exit_code == 0, r.output
    assert _check_export({"model": merged}, tol=2e-2)["layout"] == "full"
