"""``fmrilm bench backbones``: the CPU cost of one training step of each built-in backbone choice.

At the LM stage's shapes (packed sequences of ``seq_len`` tokens, ``micro_batch`` per step, the
fMRI vocabulary added), each backbone takes interleaved timed steps of plain PyTorch AdamW
(forward with the causal LM loss, backward, step), once fully fine-tuned and once with LoRA on
the family's projections plus the fMRI rows (what the LM stages train). Figures are seconds per
step and tokens/s, with each backbone's cost as a ratio to ``tiny-gpt2`` measured in the same run.
"""

from __future__ import annotations

import time

import torch

from fmrilm.bench.common import machine

BACKBONES = ("tiny-gpt2", "tiny-llama", "tiny-qwen", "smollm2-135m")


def _model(source: str, lora: bool, num_codes: int):
    from fmrilm.models.fmri_lm import add_fmri_vocab, load_backbone
    from fmrilm.models.lora import LoraSpec, wrap_lora

    model, tok, info = load_backbone(source)
    vocab = add_fmri_vocab(model, tok, num_codes)
    if lora:
        model = wrap_lora(LoraSpec(enabled=True, r=8, alpha=16), model, vocab.new_ids())
    return model.train(), vocab, info


def _step_seconds(model, vocab, seq_len: int, micro_batch: int, steps: int) -> float:
    """Median seconds of ``steps`` optimizer steps on random fMRI/text token ids (after one warm-up)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab.first_code_id + vocab.num_codes, (micro_batch, seq_len), generator=gen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run_benchmark(seq_len: int = 256, micro_batch: int = 4, steps: int = 3, num_codes: int = 128,
                  backbones: tuple[str, ...] = BACKBONES) -> dict:
    """Seconds per step of each backbone (full fine-tuning and LoRA) and the ratio to the first."""
    rows = []
    for source in backbones:
        for lora in (False, True):
            model, vocab, info = _model(source, lora, num_codes)
            seconds = _step_seconds(model, vocab, seq_len, micro_batch, steps)
            rows.append({"backbone": source, "training": "lora" if lora else "full", "seconds_per_step": seconds,
                         "tokens_per_s": seq_len * micro_batch / seconds, "pretrained": info["pretrained"],
                         "parameters": sum(p.numel() for p in model.parameters()),
                         "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)})
            del model
    base = {r["training"]: r["seconds_per_step"] for r in rows if r["backbone"] == backbones[0]}
    for r in rows:
        r["ratio_to_" + backbones[0]] = r["seconds_per_step"] / base[r["training"]]
    lines = [f"{r['backbone']:>13} {r['training']:>4}: {r['seconds_per_step']:.3f} s/step ({r['tokens_per_s']:.0f} tokens/s, "
             f"{r['ratio_to_' + backbones[0]]:.1f}x {backbones[0]}), {r['trainable'] / 1e6:.2f}M of {r['parameters'] / 1e6:.1f}M trainable"
             for r in rows]
    return {"rows": rows, "seq_len": seq_len, "micro_batch": micro_batch, "torch_threads": torch.get_num_threads(),
            "machine": machine(), "summary": "\n".join(lines)}
