"""``fmrilm bench tokenizer``: the Ray Train tokenizer stage (1 worker) vs a plain PyTorch loop.

Same model (:class:`TokenizerObjective`, same seed, alignment branch on), same windows, same batch
size and number of steps, same torch thread count, in one run. Ours: ``train.tokenizer.run`` with
one Ray Train worker streaming its shard from Ray Data; its in-loop samples/s covers everything
between steps (waiting for data included) except validation and checkpoints, from step 4 on.
Baseline: the same :func:`optimizer_step` over batches already held in memory, timed the same way.
The figure is ``ratio = ours samples/s / baseline samples/s`` (median over repeats, interleaved).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from fmrilm.bench.common import machine
from fmrilm.data.pipeline import PipelineSpec, build_windows, torch_batches
from fmrilm.models.alignment import dann_coefficient
from fmrilm.models.tokenizer import TokenizerConfig
from fmrilm.train.common import OptimSpec, RunSpec, ScalingSpec, cosine_schedule
from fmrilm.train.tokenizer import TokenizerObjective, TokenizerStageSpec, optimizer_step, run, text_inputs

TARGET = 0.95
WARM_STEPS = 3  # excluded from both sides, as in the training loop


def plain_loop(spec: TokenizerStageSpec, batches: list[dict], text_tokens, threads: int) -> dict:
    """The baseline: the training step over in-memory batches in this process."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(spec.train.seed)
        text_dim = text_tokens.shape[1] if text_tokens is not None else 8
        model = TokenizerObjective(spec.model, spec.alignment, text_dim)
        opt = torch.optim.AdamW(model.parameters(), lr=spec.train.lr, weight_decay=spec.train.weight_decay)
        total = spec.train.epochs * len(batches)
        sched = cosine_schedule(opt, spec.train.warmup_steps, total)
        step, samples, seconds = 0, 0, 0.0
        last = time.perf_counter()
        for _ in range(spec.train.epochs):
            for batch in batches:
                optimizer_step(model, opt, sched, batch, dann_coefficient(step / total), text_tokens, {}, text_dim, spec.train.grad_clip)
                step += 1
                now = time.perf_counter()
                if step > WARM_STEPS:
                    seconds += now - last
                    samples += int(batch["valid"].sum())
                last = time.perf_counter()
        return {"samples_per_s": samples / seconds, "steps": step, "threads": threads}
    finally:
        torch.set_num_threads(previous)


def ray_train(spec: TokenizerStageSpec, name: str) -> dict:
    """Ours: the tokenizer stage on Ray Train with one worker (a fresh run each call)."""
    spec = spec.model_copy(update={"run": spec.run.model_copy(update={"name": name})})
    m = run(spec)["metrics"]
    return {"samples_per_s": m["samples_per_s"], "steps": m["step"], "threads": int(m["torch_threads"])}


def bench_spec(root: str, epochs: int, batch_size: int) -> TokenizerStageSpec:
    """The stage spec both sides share: default model, all windows in train, no logs/checkpoints."""
    return TokenizerStageSpec(
        data=PipelineSpec(data=root, window=32, stride=32, split={"fractions": {"train": 1.0}}),
        model=TokenizerConfig(),
        train=OptimSpec(epochs=epochs, batch_size=batch_size, checkpoint_every=10**6, log_every=10**6),
        scaling=ScalingSpec(num_workers=1, cpus_per_worker=1),
        run=RunSpec(storage=f"{root}/../runs", logger="none"),
    )


def run_benchmark(subjects: int = 48, rois: int = 100, timepoints: int = 256, epochs: int = 4, batch_size: int = 32,
                  repeats: int = 2) -> dict:
    """Generate a synthetic cohort in a temporary folder, time both sides interleaved; returns the result dict."""
    from fmrilm import runtime
    from fmrilm.data.ingest import ingest_synthetic
    from fmrilm.data.synth import SynthParams

    with tempfile.TemporaryDirectory(prefix="fmrilm-bench-tok-") as tmp:
        root = f"{tmp}/datasets"
        ingest_synthetic(SynthParams(name="bench", subjects=subjects, n_rois=rois, n_timepoints=timepoints, seed=0), root)
        spec = bench_spec(root, epochs, batch_size)
        runtime.init_ray()
        ds, n_windows = build_windows(spec.data, "train")
        batches = list(torch_batches(ds, batch_size))
        text_tokens, _ = text_inputs(spec)
        text_tokens = torch.from_numpy(text_tokens) if text_tokens is not None else None
        ours, base = [], []
        for r in range(repeats):
            ours.append(ray_train(spec, f"bench-{r}"))
            base.append(plain_loop(spec, batches, text_tokens, ours[-1]["threads"]))
    if ours[-1]["steps"] != base[-1]["steps"]:
        raise RuntimeError(f"the two sides ran different step counts: {ours[-1]['steps']} vs {base[-1]['steps']}")
    o = statistics.median(x["samples_per_s"] for x in ours)
    b = statistics.median(x["samples_per_s"] for x in base)
    ratio = o / b
    summary = (f"bench tokenizer: Ray Train (1 worker, Ray Data stream) {o:.0f} samples/s, plain PyTorch loop (in-memory "
               f"batches) {b:.0f} samples/s; ratio {ratio:.2f} (target >= {TARGET}); {n_windows} windows x {epochs} epochs, "
               f"batch {batch_size}, {ours[-1]['threads']} torch thread(s) each, {machine()['cpus']} CPUs")
    return {"benchmark": "tokenizer", "ratio": ratio, "target": TARGET, "machine": machine(),
            "data": {"subjects": subjects, "rois": rois, "timepoints": timepoints, "windows": n_windows,
                     "epochs": epochs, "batch_size": batch_size, "steps": ours[-1]["steps"]},
            "model": spec.model.model_dump(), "ray_train": {"samples_per_s": o, "runs": ours},
            "plain_pytorch": {"samples_per_s": b, "runs": base}, "summary": summary}
