"""DeepSpeed configuration for the LM stages: one builder from a small spec.

ZeRO stage 0/1/2/3; bf16 on a GPU that supports it, fp32 on CPU (``precision="auto"``);
optional CPU offload of optimizer state (stage >= 1) and parameters (stage 3). The optimizer and
LR schedule are torch objects handed to ``deepspeed.initialize`` (a DeepSpeed ``optimizer``
section would compile a fused CPU Adam on first use), so this config carries no ``optimizer``
section; on a GPU the AdamW is torch's fused one.

``precision="autocast"`` keeps fp32 weights and optimizer state in DeepSpeed (its fp32 path hands
the torch optimizer the gradients as they are) and runs the forward under ``torch.autocast`` in
bf16, instead of DeepSpeed's bf16 mode, whose optimizer wrapper keeps fp32 master copies and
steps them with an unfused loop.
"""

from __future__ import annotations

import contextlib

from typing import Literal

from pydantic import Field, model_validator

from fmrilm.config import ConfigError, Strict


class DeepSpeedSpec(Strict):
    """How DeepSpeed shards and computes."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "bf16", "autocast", "fp32"] = Field(
        "auto", description="auto: bf16 on a GPU with bf16 support, else fp32; autocast: fp32 weights, bf16 matmuls under torch.autocast")
    micro_batch_size: int = Field(4, ge=1, description="packed sequences per worker per step")
    grad_accum: int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    offload_optimizer: bool = Field(False, description="optimizer state in CPU memory (ZeRO >= 1)")
    offload_params: bool = Field(False, description="parameters in CPU memory (ZeRO-3)")
    compile: bool = Field(False, description="torch.compile the model (DeepSpeed's engine.compile) before the first step")
    pin_memory: bool = Field(True, description="on a GPU: batches in pinned host memory, copied without blocking")

    @model_validator(mode="after")
    def _offload_needs_zero(self):
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs zero_stage >= 1")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs zero_stage 3")
        return self


def resolve_precision(spec: DeepSpeedSpec, on_gpu: bool) -> str:
    """``"bf16"`` or ``"fp32"`` for this device; refuses bf16 where the device cannot do it."""
    import torch

    bf16_ok = on_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if spec.precision == "auto":
        return "bf16" if bf16_ok else "fp32"
    if spec.precision in ("bf16", "autocast") and on_gpu and not bf16_ok:
        raise ConfigError(f"deepspeed.precision {spec.precision}: this GPU does not support bf16 (use fp32)")
    return spec.precision


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """The forward's context: ``torch.autocast`` in bf16 on ``device`` for ``"autocast"``, else nothing."""
    import torch

    if precision != "autocast":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def adamw(params, lr: float, weight_decay: float, on_gpu: bool):
    """torch AdamW over ``params``: the fused kernel on a GPU, torch's default elsewhere."""
    import torch

    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if on_gpu else {}))


def build_config(spec: DeepSpeedSpec, world_size: int, grad_clip: float, on_gpu: bool) -> dict:
    """The DeepSpeed config dict for ``deepspeed.initialize(config=...)``."""
    precision = resolve_precision(spec, on_gpu)
    zero: dict = {"stage": spec.zero_stage}
    if spec.zero_stage >= 2:
        zero |= {"overlap_comm": on_gpu, "contiguous_gradients": True, "reduce_scatter": True}
    if spec.zero_stage == 3:
        zero |= {"stage3_gather_16bit_weights_on_model_save": True}
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if spec.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.grad_accum,
        "train_batch_size": spec.micro_batch_size * spec.grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
