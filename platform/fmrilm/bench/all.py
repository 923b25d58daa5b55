"""``fmrilm bench all``: every benchmark with its defaults, one after another, into one table.

Each row is one benchmark's own side-by-side run (ours vs its baseline in the same process
tree): the ratio, the target, and the absolute figures of both sides, labelled with the machine.
A benchmark that fails is recorded with its error; the others still run.
"""

from __future__ import annotations

import json
import logging
import time

from fmrilm.bench.common import machine

log = logging.getLogger("fmrilm.bench")
BENCHMARKS = ("ingest", "tokenizer", "lm")
UNITS = {"ingest": "windows/s", "tokenizer": "windows/s", "lm": "tokens/s"}


def _sides(result: dict) -> tuple[float, float]:
    """(ours, baseline) absolute throughput of a benchmark result."""
    name = result["benchmark"]
    if name == "ingest":
        return result["ray_data"]["windows_per_s"], result["pyarrow"]["windows_per_s"]
    if name == "tokenizer":
        return result["ray_train"]["samples_per_s"], result["plain_pytorch"]["samples_per_s"]
    return result["ray_train_deepspeed"]["tokens_per_s"], result["plain_pytorch"]["tokens_per_s"]


def run_all(only: tuple[str, ...] = BENCHMARKS) -> dict:
    """Run the benchmarks in ``only``; returns ``{"machine", "rows": [...], "results": {name: result}}``."""
    import importlib

    rows, results = [], {}
    for name in only:
        log.info("bench %s ...", name)
        start = time.perf_counter()
        try:
            result = importlib.import_module(f"fmrilm.bench.{name}").run_benchmark()
        except Exception as err:  # recorded; the other benchmarks still run
            log.error("bench %s failed: %s", name, err)
            rows.append({"benchmark": name, "error": f"{type(err).__name__}: {err}", "seconds": time.perf_counter() - start})
            continue
        results[name] = result
        ours, base = _sides(result)
        rows.append({"benchmark": name, "ratio": result["ratio"], "target": result["target"], "met": result["ratio"] >= result["target"],
                     "ours": ours, "baseline": base, "unit": UNITS[name], "seconds": time.perf_counter() - start,
                     "summary": result["summary"]})
    return {"machine": machine(), "rows": rows, "results": results}


def markdown(summary: dict) -> str:
    """The benchmark table as Markdown, with the machine it ran on."""
    m = summary["machine"]
    lines = [f"# fmrilm benchmarks\n\nMachine: {m['cpus']} CPUs ({m['processor']}), {m['gpu'] or 'no GPU'}; "
             f"Python {m['python']}, torch {m['torch']}, Ray {m['ray']}. Ratios are ours / baseline, both measured in the same run.\n",
             "| benchmark | ratio | target | met | ours | baseline | unit |", "|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        if "error" in r:
            lines.append(f"| {r['benchmark']} | failed: {r['error']} | | | | | |")
        else:
            lines.append(f"| {r['benchmark']} | {r['ratio']:.2f} | {r['target']:.2f} | {'yes' if r['met'] else 'no'} | "
                         f"{r['ours']:,.0f} | {r['baseline']:,.0f} | {r['unit']} |")
    lines += [""] + [f"- {r['summary']}" for r in summary["rows"] if "summary" in r]
    return "\n".join(lines) + "\n"


def write(summary: dict, out_dir: str) -> dict[str, str]:
    """``bench.json`` and ``bench.md`` under ``out_dir`` (a URI); returns their URIs."""
    from fmrilm import storage

    loc = storage.resolve(out_dir)
    storage.write_text(loc.join("bench.json"), json.dumps(summary, indent=1, default=str))
    storage.write_text(loc.join("bench.md"), markdown(summary))
    return {"bench.json": loc.join("bench.json").uri, "bench.md": loc.join("bench.md").uri}
