"""The GPU-speed code paths behind flags, checked on CPU: bf16 autocast with fp32 weights
instead of DeepSpeed's bf16 mode, the optimizer choice, and the benchmark's variant names."""

import pytest
import torch

from fmrilm.config import ConfigError
from fmrilm.train.deepspeed import DeepSpeedSpec, adamw, autocast, build_config, resolve_precision


def test_autocast_keeps_deepspeed_in_fp32():
    spec = DeepSpeedSpec(zero_stage=0, precision="autocast")
    assert resolve_precision(spec, on_gpu=False) == "autocast"
    assert build_config(spec, 1, 1.0, on_gpu=False)["bf16"]["enabled"] is False  # no bf16 optimizer wrapper
    assert build_config(DeepSpeedSpec(precision="bf16"), 1, 1.0, on_gpu=False)["bf16"]["enabled"] is True
    assert resolve_precision(DeepSpeedSpec(), on_gpu=False) == "fp32"


def test_autocast_runs_matmuls_in_bf16_and_leaves_weights_fp32():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    with autocast("autocast", "cpu"):
        y = layer(x)
    with autocast("fp32", "cpu"):
        z = layer(x)
    assert y.dtype == torch.bfloat16 and z.dtype == torch.float32 and layer.weight.dtype == torch.float32
    torch.testing.assert_close(y.float(), z, atol=5e-2, rtol=5e-2)


def test_adamw_is_fused_only_on_a_gpu():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert adamw(params, 1e-3, 0.0, on_gpu=False).defaults["fused"] in (None, False)  # the CPU keeps torch's default


def test_bench_variants_parse_or_say_what_is_wrong():
    from fmrilm.bench.lm import parse_variant

    assert parse_variant("auto") == {"precision": "auto", "zero_stage": 0}
    assert parse_variant("autocast+compile+zero2") == {"precision": "autocast", "zero_stage": 2, "compile": True}
    with pytest.raises(ConfigError, match="precision 'fp8'"):
        parse_variant("fp8")
    with pytest.raises(ConfigError, match="unknown part 'turbo'"):
        parse_variant("bf16+turbo")


def _tokenizer():
    from fmrilm.models.tokenizer import FMRITokenizer, TokenizerConfig

    torch.manual_seed(0)
    return FMRITokenizer(TokenizerConfig(patch=8, width=16, depth=2, heads=2, code_dim=8, num_codes=16)).train()


def test_tokenizer_activation_checkpointing_gives_the_same_gradients():
    x = torch.randn(3, 4, 16)
    grads = []
    for checkpointing in (False, True):
        model = _tokenizer()
        model.checkpointing = checkpointing
        out = model(x)
        ((out.recon - x) ** 2).mean().backward()
        grads.append(model.patch_embed.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_tokenizer_under_autocast_keeps_the_code_search_in_fp32():
    model = _tokenizer()
    x = torch.randn(3, 4, 16)
    with autocast("autocast", "cpu"):
        out = model(x)
    assert out.recon.dtype == torch.bfloat16 and out.quant.quantized.dtype == torch.float32  # matmuls in bf16, the code search not
    assert model.quantizer.codebook.dtype == torch.float32 and torch.isfinite(out.recon).all()


def test_tokenizer_compute_options_run_and_parse():
    from fmrilm.bench.tokenizer import compute_step_loop, parse_option

    assert parse_option("autocast+checkpointing") == {"precision": "autocast", "activation_checkpointing": True}
    with pytest.raises(ConfigError, match="unknown part 'fp16'"):
        parse_option("fp16")
    r = compute_step_loop("small", parse_option("autocast+checkpointing"), batch_size=2, steps=4, threads=1, on_gpu=False)
    assert r["samples_per_s"] > 0 and r["peak_rss_mb"] > 0 and r["params"] > 0
