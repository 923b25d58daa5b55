"""``fmrilm bench lm``: the LM stage (Ray Train, 1 worker, DeepSpeed) vs a plain PyTorch loop.

Same backbone (built-in decoder, same seed), same fMRI vocabulary and packed batches (synthetic
codes and captions, so no earlier stage is needed), same micro-batch, optimizer, schedule, step
count and torch thread count. Ours: :func:`fmrilm.train.lm.fit`; its in-loop tokens/s counts
non-padding tokens per second from step 3 on, waiting for data included, checkpoints excluded.
Baseline: :func:`plain_loop` in a fresh process over the same batches held in memory, timed the
same way. Peak memory: resident set (CPU) or peak allocated GPU memory of each side's process.
On a GPU, MFU = 6 x parameters x tokens/s / the GPU's dense bf16 peak. Several configurations of
ours (precision, ``torch.compile``, ZeRO stage: ``variants``) run one after another in the same
run, each reported beside the same plain loop.
"""

from __future__ import annotations

import math
import multiprocessing
import tempfile
import time

import numpy as np
import torch

from fmrilm.bench.common import machine
from fmrilm.data.lm_sequences import pack
from fmrilm.models.fmri_lm import extend_tokenizer, forward_loss
from fmrilm.models.text import FALLBACK_CORPUS
from fmrilm.train.optim import cosine_schedule, OptimSpec
from fmrilm.train.specs import RunSpec, ScalingSpec
from fmrilm.train.deepspeed import DeepSpeedSpec
from fmrilm.train.lm import BackboneSpec, PretrainSpec, text_tokenizer, build_examples, build_model, fit, pad_rows
from fmrilm.train.loop import packed_collate, peak_memory

TARGET = 0.95
WARM_STEPS = 2
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def synthetic_packed(spec: PretrainSpec, num_codes: int, scans: int, rois: int, steps: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Packed sequences of all three objectives from random codes and the fallback captions."""
    rng = np.random.default_rng(seed)
    tok = text_tokenizer(spec)
    vocab = extend_tokenizer(tok, num_codes)
    codes = {f"s{i:04d}": rng.integers(0, num_codes, (rois, steps)) for i in range(scans)}
    captions = {sid: [FALLBACK_CORPUS[i % len(FALLBACK_CORPUS)]] for i, sid in enumerate(codes)}
    packed = pack(build_examples(codes, captions, tok, vocab, spec.seq_len, spec.objectives), spec.seq_len, tok.pad_token_id)
    return pad_rows(packed, spec.scaling.num_workers, tok.pad_token_id)


def plain_loop(spec: PretrainSpec, packed: dict[str, np.ndarray], codebook: torch.Tensor, threads: int, on_gpu: bool) -> dict:
    """The baseline: the same model and batches with torch AdamW, no Ray and no DeepSpeed."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if on_gpu else "cpu")
    model, _, _, _ = build_model(spec, int(codebook.shape[0]), codebook)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model.to(device=device, dtype=dtype).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.train.lr, weight_decay=spec.train.weight_decay)
    mb = spec.deepspeed.micro_batch_size
    per_epoch = math.ceil(len(packed["ids"]) / mb)
    total = spec.train.epochs * per_epoch
    sched = cosine_schedule(opt, spec.train.warmup_steps, total)
    collate = packed_collate()
    batches = [collate({k: v[i : i + mb] for k, v in packed.items()}) for i in range(0, len(packed["ids"]), mb)]
    weights = spec.objectives.by_id()
    step, tokens, seconds = 0, 0, 0.0
    last = time.perf_counter()
    for _ in range(spec.train.epochs):
        for batch in batches:
            loss, _ = forward_loss(model, {k: v.to(device) for k, v in batch.items()}, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.train.grad_clip)
            opt.step()
            sched.step()
            if on_gpu:
                torch.cuda.synchronize()
            step += 1
            now = time.perf_counter()
            if step > WARM_STEPS:
                seconds += now - last
                tokens += int((batch["segments"] > 0).sum())
            last = time.perf_counter()
    return {"tokens_per_s": tokens / seconds, "steps": step, "threads": threads,
            "params": sum(p.numel() for p in model.parameters()), **peak_memory(on_gpu)}


def _child(queue, *args) -> None:
    try:
        queue.put(plain_loop(*args))
    except BaseException as err:  # reported by the parent
        queue.put(err)


def baseline_in_fresh_process(*args) -> dict:
    """:func:`plain_loop` in a spawned process, so its peak memory is its own."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, *args))
    proc.start()
    result = queue.get()
    proc.join()
    if isinstance(result, BaseException):
        raise result
    return result


def parse_variant(text: str) -> dict:
    """``"<precision>[+compile][+zero<N>]"`` (e.g. ``auto``, ``autocast+compile``, ``bf16+zero2``) ->
    DeepSpeedSpec fields; a clear error naming the part it does not know."""
    from fmrilm.config import ConfigError

    parts = text.split("+")
    fields: dict = {"precision": parts[0], "zero_stage": 0}
    if parts[0] not in ("auto", "bf16", "autocast", "fp32"):
        raise ConfigError(f"bench lm: variant {text!r}: precision {parts[0]!r} is not one of auto, bf16, autocast, fp32")
    for extra in parts[1:]:
        if extra == "compile":
            fields["compile"] = True
        elif extra in ("zero0", "zero1", "zero2", "zero3"):
            fields["zero_stage"] = int(extra[-1])
        else:
            raise ConfigError(f"bench lm: variant {text!r}: unknown part {extra!r} (compile, zero0-zero3)")
    return fields


def run_benchmark(width: int = 128, layers: int = 4, seq_len: int = 256, micro_batch: int = 4, epochs: int = 2,
                  scans: int = 48, rois: int = 32, steps: int = 24, num_codes: int = 256, variants: tuple[str, ...] = ("auto",)) -> dict:
    """Time the plain loop and each of our ``variants`` (:func:`parse_variant`) on the same
    synthetic batches, one after the other in one run; returns the result dict (``ratio``: the
    first variant's tokens/s over the plain loop's)."""
    from fmrilm import runtime

    on_gpu = torch.cuda.is_available()
    configs = {v: parse_variant(v) for v in variants}
    ours: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fmrilm-bench-lm-") as tmp:
        def spec_for(fields: dict, name: str) -> PretrainSpec:
            return PretrainSpec(
                backbone=BackboneSpec(source="tiny-gpt2", tiny_width=width, tiny_layers=layers), seq_len=seq_len,
                deepspeed=DeepSpeedSpec(micro_batch_size=micro_batch, **fields),
                train=OptimSpec(epochs=epochs, lr=5e-4, warmup_steps=2, checkpoint_every=10**6, log_every=10**6),
                scaling=ScalingSpec(num_workers=1, cpus_per_worker=1, use_gpu=on_gpu), run=RunSpec(storage=tmp, name=name, logger="none"))

        first = spec_for(configs[variants[0]], "bench-lm-0")
        codebook = torch.nn.functional.normalize(torch.randn(num_codes, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
        packed = synthetic_packed(first, num_codes, scans, rois, steps)
        runtime.init_ray()
        for i, (name, fields) in enumerate(configs.items()):
            m = fit(spec_for(fields, f"bench-lm-{i}"), packed, codebook).metrics
            ours[name] = {"tokens_per_s": m["tokens_per_s"], "steps": m["step"], "threads": int(m["torch_threads"]),
                          "input_wait_fraction": m["input_wait_fraction"], "precision": m["precision"],
                          "zero_stage": fields["zero_stage"], "compile": fields.get("compile", False),
                          "peak_rss_mb": m["peak_rss_mb"], **({"peak_gpu_mb": m["peak_gpu_mb"]} if on_gpu else {})}
        head = ours[variants[0]]
        base = baseline_in_fresh_process(first, packed, codebook, head["threads"], on_gpu)
    for name, r in ours.items():
        if r["steps"] != base["steps"]:
            raise RuntimeError(f"variant {name} ran {r['steps']} steps, the plain loop {base['steps']}")
        r["ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
    mem = "peak_gpu_mb" if on_gpu else "peak_rss_mb"
    for r in ours.values():
        r["memory_ratio"] = r[mem] / base[mem]
    result = {"benchmark": "lm", "ratio": head["ratio"], "target": TARGET, "machine": machine(),
              "model": {"backbone": "tiny-gpt2", "width": width, "layers": layers, "params": base["params"], "seq_len": seq_len},
              "data": {"sequences": len(packed["ids"]), "micro_batch": micro_batch, "epochs": epochs,
                       "tokens": int((packed["segments"] > 0).sum()) * epochs},
              "ray_train_deepspeed": head, "variants": ours, "plain_pytorch": base}
    lines = [f"bench lm: {base['params'] / 1e6:.1f}M parameters, {base['steps']} steps of {micro_batch} x {seq_len} tokens, "
             f"{head['threads']} torch thread(s), {machine()['cpus']} CPUs; plain PyTorch {base['tokens_per_s']:.0f} tokens/s, "
             f"{base[mem]:.0f} MiB ({mem})"]
    peak, name = None, None
    if on_gpu:
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    for variant, r in ours.items():
        line = (f"  Ray Train + DeepSpeed ZeRO-{r['zero_stage']} {variant} ({r['precision']}): {r['tokens_per_s']:.0f} tokens/s, "
                f"ratio {r['ratio']:.2f} (target >= {TARGET}), memory {r['memory_ratio']:.2f}x, waited {r['input_wait_fraction']:.0%} for input")
        if peak:
            r["mfu"] = 6 * base["params"] * r["tokens_per_s"] / peak
            line += f", MFU {r['mfu']:.1%}"
        lines.append(line)
    if peak:
        base["mfu"] = 6 * base["params"] * base["tokens_per_s"] / peak
        result["mfu"] = {"ray_train_deepspeed": head["mfu"], "plain_pytorch": base["mfu"]}
        lines.append(f"  MFU = 6 x {base['params'] / 1e6:.1f}M parameters x tokens/s / {peak / 1e12:.0f} TFLOP/s (dense bf16 peak of {name}); "
                     f"plain PyTorch {base['mfu']:.1%}")
    result["summary"] = "\n".join(lines)
    return result
