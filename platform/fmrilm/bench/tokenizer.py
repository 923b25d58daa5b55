"""``fmrilm bench tokenizer``: the Ray Train tokenizer stage (1 worker) vs a plain PyTorch loop.

Same model (:class:`~fmrilm.models.tokenizer_objective.TokenizerObjective`, same seed, alignment branch on), same windows, same batch
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
from dataclasses import asdict

import torch

from fmrilm.bench.common import machine
from fmrilm.data.pipeline import PipelineSpec, build_windows, torch_batches
from fmrilm.features.text_bank import text_inputs
from fmrilm.models.alignment import dann_coefficient
from fmrilm.models.tokenizer import TokenizerConfig
from fmrilm.models.tokenizer_objective import TokenizerObjective
from fmrilm.train.optim import cosine_schedule, OptimSpec
from fmrilm.train.specs import RunSpec, ScalingSpec
from fmrilm.train.tokenizer import TokenizerStageSpec, optimizer_step, run

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
        data=PipelineSpec(root=root, window=32, stride=32, split={"fractions": {"train": 1.0}}),
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
        text_tokens, _ = text_inputs(spec.alignment, spec.data)
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
            "model": asdict(spec.model), "ray_train": {"samples_per_s": o, "runs": ours},
            "plain_pytorch": {"samples_per_s": b, "runs": base}, "summary": summary}


SIZES = {  # fMRI-LM's tokenizer (ViT-S-like: 450 ROIs x 160 time points, one patch per ROI) and a CPU-sized one
    "vit-s": {"rois": 450, "window": 160, "model": {"patch": 160, "width": 384, "depth": 12, "heads": 6, "mlp_ratio": 4.0,
                                                     "code_dim": 128, "num_codes": 8192}},
    "small": {"rois": 64, "window": 64, "model": {"patch": 16, "width": 64, "depth": 2, "heads": 4, "code_dim": 32, "num_codes": 512}},
}


def parse_option(text: str) -> dict:
    """``"fp32"``, ``"autocast"``, ``"checkpointing"`` or ``"autocast+checkpointing"`` -> ComputeSpec fields."""
    from fmrilm.config import ConfigError

    fields = {"precision": "fp32", "activation_checkpointing": False}
    for part in text.split("+"):
        if part in ("fp32", "autocast"):
            fields["precision"] = part
        elif part == "checkpointing":
            fields["activation_checkpointing"] = True
        else:
            raise ConfigError(f"bench tokenizer: option {text!r}: unknown part {part!r} (fp32, autocast, checkpointing)")
    return fields


def compute_step_loop(size: str, option: dict, batch_size: int, steps: int, threads: int, on_gpu: bool) -> dict:
    """The training step of the tokenizer at ``size`` on random windows ``[batch, rois, window]``
    with one compute ``option`` (:func:`parse_option`): samples/s after ``WARM_STEPS`` and peak
    memory of this process."""
    from fmrilm.models.alignment import AlignmentConfig
    from fmrilm.train.loop import peak_memory

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if on_gpu else "cpu")
    shape = SIZES[size]
    cfg = TokenizerConfig(**shape["model"], max_rois=max(512, shape["rois"]))
    model = TokenizerObjective(cfg, AlignmentConfig(), 8).to(device)
    model.tokenizer.checkpointing = option["activation_checkpointing"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = cosine_schedule(opt, 1, steps)
    text_tokens = torch.randn(64, 8, device=device)
    samples, seconds = 0, 0.0
    for step in range(steps):
        batch = {"x": torch.randn(batch_size, shape["rois"], shape["window"]), "valid": torch.ones(batch_size, dtype=torch.bool),
                 "scan_id": [f"s{i}" for i in range(batch_size)]}
        start = time.perf_counter()
        optimizer_step(model, opt, sched, batch, 0.1, text_tokens, {}, 8, 1.0, option["precision"])
        if on_gpu:
            torch.cuda.synchronize()
        if step >= WARM_STEPS:
            seconds += time.perf_counter() - start
            samples += batch_size
    return {"samples_per_s": samples / seconds, "params": sum(p.numel() for p in model.parameters()), **peak_memory(on_gpu)}


def _compute_child(queue, *args) -> None:
    try:
        queue.put(compute_step_loop(*args))
    except BaseException as err:  # reported by the parent
        queue.put(err)


def compute_options(size: str = "vit-s", options: tuple[str, ...] = ("fp32", "autocast", "checkpointing", "autocast+checkpointing"),
                    batch_size: int = 16, steps: int = 8) -> dict:
    """The tokenizer's step at ``size`` with each compute option, each in a fresh process (so each
    peak memory is its own), one after another in one run; ratios against the first option."""
    import multiprocessing

    from fmrilm.config import ConfigError

    if size not in SIZES:
        raise ConfigError(f"bench tokenizer: size {size!r} is not one of {sorted(SIZES)}")
    if steps <= WARM_STEPS:
        raise ConfigError(f"bench tokenizer: steps must exceed the {WARM_STEPS} warm-up steps")
    parsed = {o: parse_option(o) for o in options}
    on_gpu = torch.cuda.is_available()
    threads = torch.get_num_threads()
    ctx = multiprocessing.get_context("spawn")
    results = {}
    for name, option in parsed.items():
        queue = ctx.Queue()
        proc = ctx.Process(target=_compute_child, args=(queue, size, option, batch_size, steps, threads, on_gpu))
        proc.start()
        out = queue.get()
        proc.join()
        if isinstance(out, BaseException):
            raise out
        results[name] = out
    first = results[options[0]]
    mem = "peak_gpu_mb" if on_gpu else "peak_rss_mb"
    for r in results.values():
        r["speed_ratio"] = r["samples_per_s"] / first["samples_per_s"]
        r["memory_ratio"] = r[mem] / first[mem]
    lines = [f"bench tokenizer --size {size}: {SIZES[size]['rois']} ROIs x {SIZES[size]['window']} time points, "
             f"{first['params'] / 1e6:.1f}M parameters, batch {batch_size}, {steps - WARM_STEPS} timed steps, "
             f"{'GPU ' + torch.cuda.get_device_name(0) if on_gpu else f'{threads} CPU thread(s)'}; against {options[0]}:"]
    lines += [f"  {name}: {r['samples_per_s']:.2f} samples/s ({r['speed_ratio']:.2f}x), peak memory {r[mem]:.0f} MiB "
              f"({r['memory_ratio']:.2f}x, {mem})" for name, r in results.items()]
    return {"benchmark": "tokenizer-compute", "size": size, "model": SIZES[size], "batch_size": batch_size, "steps": steps,
            "machine": machine(), "options": results, "summary": "\n".join(lines)}
