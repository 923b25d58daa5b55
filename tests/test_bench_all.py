"""`fmrilm bench all` aggregation: every benchmark's ratio and both sides' absolute figures in one
table with the machine; a failing benchmark is recorded and the others still run."""

import json

from fmrilm.bench import all as bench_all


def test_one_table_from_every_benchmark_and_failures_recorded(monkeypatch, tmp_path):
    from fmrilm.bench import ingest, lm, tokenizer

    monkeypatch.setattr(ingest, "run_benchmark", lambda: {"benchmark": "ingest", "ratio": 0.94, "target": 0.9, "summary": "ingest s",
                                                          "ray_data": {"windows_per_s": 940.0}, "pyarrow": {"windows_per_s": 1000.0}})

    def broken():
        raise RuntimeError("no local S3")
    monkeypatch.setattr(tokenizer, "run_benchmark", broken)
    monkeypatch.setattr(lm, "run_benchmark", lambda: {"benchmark": "lm", "ratio": 0.5, "target": 0.95, "summary": "lm s",
                                                      "ray_train_deepspeed": {"tokens_per_s": 50.0}, "plain_pytorch": {"tokens_per_s": 100.0}})
    summary = bench_all.run_all()
    rows = {r["benchmark"]: r for r in summary["rows"]}
    assert rows["ingest"]["met"] and rows["ingest"]["ours"] == 940.0 and rows["ingest"]["baseline"] == 1000.0
    assert rows["tokenizer"]["error"] == "RuntimeError: no local S3"
    assert not rows["lm"]["met"] and rows["lm"]["unit"] == "tokens/s"
    files = bench_all.write(summary, str(tmp_path))
    md = open(files["bench.md"]).read()
    assert "| ingest | 0.94 | 0.90 | yes | 940 | 1,000 | windows/s |" in md
    assert "| tokenizer | failed: RuntimeError: no local S3 |" in md and f"{summary['machine']['cpus']} CPUs" in md
    assert json.load(open(files["bench.json"]))["rows"][2]["ratio"] == 0.5
