"""Where does the LM stage lose to a plain loop on a GPU? The same model and batches (GPT-2-small
size, 8 x 1024 tokens, bf16), no Ray: plain loops (bf16 weights; fp32 weights + autocast; fused
AdamW) vs the DeepSpeed engine at ZeRO-0/1/2. Needs a CUDA GPU; prints ms per step.
Figures: docs/benchmarks.md, "On a GPU"."""

import os
import time

import torch

from fmrilm.bench.lm import synthetic_packed
from fmrilm.train.optim import OptimSpec
from fmrilm.train.specs import RunSpec, ScalingSpec
from fmrilm.train.deepspeed import DeepSpeedSpec, build_config
from fmrilm.models.fmri_lm import forward_loss
from fmrilm.train.lm import BackboneSpec, PretrainSpec, build_model
from fmrilm.train.loop import packed_collate

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
SPEC = PretrainSpec(backbone=BackboneSpec(source="tiny-gpt2", tiny_width=768, tiny_layers=12), seq_len=1024,
                    deepspeed=DeepSpeedSpec(zero_stage=0, micro_batch_size=8), train=OptimSpec(epochs=1, lr=5e-4),
                    scaling=ScalingSpec(num_workers=1, use_gpu=True), run=RunSpec(storage="/tmp/fmrilm-exp", name="x", logger="none"))
CODEBOOK = torch.nn.functional.normalize(torch.randn(256, 16), dim=-1)
WEIGHTS = SPEC.objectives.by_id()


def batches(n: int = 24) -> list[dict]:
    packed = synthetic_packed(SPEC, 256, 96, 32, 24)
    collate = packed_collate()
    return [{k: v.cuda() for k, v in collate({k: v[i:i + 8] for k, v in packed.items()}).items()} for i in range(0, 8 * n, 8)]


def ms_per_step(step, data: list[dict], warm: int = 3) -> float:
    for b in data[:warm]:
        step(b)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for b in data[warm:]:
        step(b)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (len(data) - warm) * 1000


def plain_step(weights_dtype: torch.dtype, autocast: bool, fused: bool):
    model, *_ = build_model(SPEC, 256, CODEBOOK)
    model.cuda().to(weights_dtype).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, fused=fused)

    def step(b):
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            loss, _ = forward_loss(model, b, WEIGHTS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step


def deepspeed_step(zero: int):
    import deepspeed

    model, *_ = build_model(SPEC, 256, CODEBOOK)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=build_config(DeepSpeedSpec(zero_stage=zero, micro_batch_size=8), 1, 1.0, True))

    def step(b):
        loss, _ = forward_loss(engine, b, WEIGHTS)
        engine.backward(loss)
        engine.step()
    return step, type(engine.optimizer).__name__


def main() -> None:
    import deepspeed

    data = batches()
    print(f"plain, bf16 weights, AdamW: {ms_per_step(plain_step(torch.bfloat16, False, False), data):.1f} ms/step")
    print(f"plain, fp32 weights + autocast bf16, AdamW: {ms_per_step(plain_step(torch.float32, True, False), data):.1f} ms/step")
    print(f"plain, fp32 weights + autocast bf16, fused AdamW: {ms_per_step(plain_step(torch.float32, True, True), data):.1f} ms/step")
    deepspeed.init_distributed("nccl")
    for zero in (0, 1, 2):
        step, name = deepspeed_step(zero)
        print(f"DeepSpeed ZeRO-{zero} bf16 ({name}): {ms_per_step(step, data):.1f} ms/step")


if __name__ == "__main__":
    main()
