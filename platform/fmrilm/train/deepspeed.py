"""DeepSpeed configuration for the LM stages: one builder from a small spec.

ZeRO stage 0/1/2/3; bf16 on a GPU that supports it, fp32 on CPU (``precision="auto"``);
optional CPU offload of optimizer state (stage >= 1) and parameters (stage 3). The optimizer and
LR schedule are torch objects handed to ``deepspeed.initialize`` (a DeepSpeed ``optimizer``
section would compile a fused CPU Adam on first use), so this config carries no ``optimizer``
section.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fmrilm.config import Strict


class DeepSpeedSpec(Strict):
    """How DeepSpeed shards and computes."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on a GPU with bf16 support, else fp32")
    micro_batch_size: int = Field(4, ge=1, description="packed sequences per worker per step")
    grad_accum: int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    offload_optimizer: bool = Field(False, description="optimizer state in CPU memory (ZeRO >= 1)")
    offload_params: bool = Field(False, description="parameters in CPU memory (ZeRO-3)")

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
    if spec.precision == "bf16" and on_gpu and not bf16_ok:
        raise ValueError("deepspeed.precision bf16: this GPU does not support bf16 (use fp32)")
    return spec.precision


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
