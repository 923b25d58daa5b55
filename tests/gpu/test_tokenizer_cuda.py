"""The tokenizer stage on a CUDA GPU (skipped without one; CI has none): one GPU worker trains the
aligned VQ tokenizer (domain classifier + captions) from a parquet scan table, validates, and
exports, in fp32 and under bf16 autocast with activation checkpointing; the reconstruction
improves and the artifact reloads."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("precision,checkpointing", [("fp32", False), ("autocast", True)])
def test_tokenizer_stage_on_gpu(gpu_ray, tmp_path, precision, checkpointing):
    from fmrilm.data.ingest import ingest_synthetic
    from fmrilm.data.pipeline import PipelineSpec
    from fmrilm.data.synth import SynthParams
    from fmrilm.features.job import FeaturesSpec
    from fmrilm.features.job import run as features
    from fmrilm.models.alignment import AlignmentConfig
    from fmrilm.models.fmri_lm import load_backbone
    from fmrilm.models.tokenizer import TokenizerConfig
    from fmrilm.train.optim import OptimSpec
    from fmrilm.train.specs import RunSpec, ScalingSpec
    from fmrilm.artifacts.tokenizer import load_tokenizer
    from fmrilm.train.tokenizer import ComputeSpec, TokenizerStageSpec, run

    data = str(tmp_path / "datasets")
    ingest_synthetic(SynthParams(name="gpu", subjects=24, n_rois=16, n_networks=4, n_timepoints=128, seed=1), data)
    features(FeaturesSpec(data={"root": data}, ica_components=3, captions_per_scan=2, plot=False, probe=False))
    lm, tok, _ = load_backbone("tiny-gpt2", tiny_width=32)  # a local text model (no hub, no MiniLM weights needed)
    lm.save_pretrained(tmp_path / "text")
    tok.save_pretrained(tmp_path / "text")
    out = run(TokenizerStageSpec(
        data=PipelineSpec(root=data, window=32, stride=16),
        model=TokenizerConfig(patch=16, width=64, heads=4, depth=2, code_dim=16, num_codes=64),
        alignment=AlignmentConfig(domain_weight=0.5, contrastive_weight=0.1, text_source=str(tmp_path / "text")),
        train=OptimSpec(epochs=40, batch_size=16, lr=2e-3, checkpoint_every=10**6, log_every=10),
        compute=ComputeSpec(precision=precision, activation_checkpointing=checkpointing),
        scaling=ScalingSpec(num_workers=1, cpus_per_worker=1, use_gpu=True),
        run=RunSpec(storage=str(tmp_path / "runs"), name="tok-gpu", logger="none")))
    m = out["metrics"]
    print(f"tokenizer on GPU ({precision}, checkpointing {checkpointing}): val R2 {m['val/r2']:.3f}, used {m['val/used_fraction']:.2f}, {m['samples_per_s']:.0f} windows/s")
    assert m["val/r2"] > 0.1 and m["val/used_fraction"] > 0.1
    model, _ = load_tokenizer(out["artifact"])
    assert model.cfg.num_codes == 64
