"""The LM stage on a CUDA GPU (skipped without one; CI has none): Ray Train + DeepSpeed ZeRO-2 and
ZeRO-3 in bf16 (DeepSpeed's bf16 mode, and fp32 weights under bf16 autocast), with and without
LoRA, on one GPU worker. The loss falls, the engine really ran in
bf16 on the GPU, and the export reloaded with plain transformers (+ peft) on the GPU gives the
in-training logits up to bf16 rounding."""

import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _spec(tmp_path, zero: int, lora: bool, precision: str = "auto"):
    from fmrilm.train.optim import OptimSpec
    from fmrilm.train.specs import RunSpec, ScalingSpec
    from fmrilm.train.deepspeed import DeepSpeedSpec
    from fmrilm.models.lora import LoraSpec
    from fmrilm.train.lm import BackboneSpec, PretrainSpec

    return PretrainSpec(
        backbone=BackboneSpec(source="tiny-llama", tiny_width=256, tiny_layers=4), seq_len=256,
        lora=LoraSpec(enabled=lora, r=8, alpha=16),
        deepspeed=DeepSpeedSpec(zero_stage=zero, micro_batch_size=8, precision=precision),
        train=OptimSpec(epochs=4, lr=2e-3, warmup_steps=2, checkpoint_every=10**6, log_every=4),
        scaling=ScalingSpec(num_workers=1, cpus_per_worker=1, use_gpu=True),
        run=RunSpec(storage=str(tmp_path), name=f"cuda-z{zero}-{int(lora)}-{precision}", logger="none"))


@pytest.mark.parametrize("zero,lora,precision", [(2, False, "auto"), (3, False, "auto"), (3, True, "auto"), (0, False, "autocast"),
                                                (2, False, "autocast"), (3, True, "autocast")])
def test_zero_bf16_on_gpu_trains_and_exports(gpu_ray, tmp_path, zero, lora, precision):
    from fmrilm.bench.lm import synthetic_packed
    from fmrilm.artifacts.lm import load_exported
    from fmrilm.models.fmri_lm import probe_logits
    from fmrilm.train.lm import fit

    spec = _spec(tmp_path, zero, lora, precision)
    codebook = torch.nn.functional.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    packed = synthetic_packed(spec, 64, scans=32, rois=16, steps=24)
    m = fit(spec, packed, codebook).metrics
    assert m["precision"] == ("bf16" if precision == "auto" else precision) and m["peak_gpu_mb"] > 0
    # full fine-tuning falls fast; LoRA (r=8) on a random-weight backbone trains only adapters and the fMRI rows
    assert m["loss"] < (0.95 if lora else 0.8) * m["first_loss"], m
    model, _, meta = load_exported(os.path.join(tmp_path, spec.run.name, "model"))
    assert meta["layout"] == ("base+adapter" if lora else "full")
    probe = torch.load(os.path.join(tmp_path, spec.run.name, "model", "probe.pt"), weights_only=False)
    model = model.to("cuda", torch.bfloat16)
    logits = probe_logits(model, probe["inputs"], "cuda")
    # same weights, same device and dtype: equal up to bf16 rounding of the reloaded copy
    diff = (logits - probe["logits"]).abs()
    print(f"zero={zero} lora={lora} {precision}: first loss {m['first_loss']:.3f} -> {m['loss']:.3f}; "
          f"{m['tokens_per_s']:.0f} tokens/s; peak GPU {m['peak_gpu_mb']:.0f} MiB; reload max |dlogit| {diff.max():.4f}")
    torch.testing.assert_close(logits, probe["logits"], atol=0.1, rtol=0.02)
