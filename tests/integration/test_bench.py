import json

import pytest
from typer.testing import CliRunner

from fmrilm.cli import app

pytestmark = pytest.mark.integration


def test_bench_ingest_reports_a_ratio_of_the_same_work(ray_cluster, tmp_path):
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", "ingest", "--json", "--subjects", "8", "--rois", "10", "--timepoints", "96", "--repeats", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["benchmark"] == "ingest" and result["ratio"] > 0
    assert result["ray_data"]["windows"] == result["pyarrow"]["windows"] == 8 * 3
    assert result["ratio"] == pytest.approx(result["ray_data"]["windows_per_s"] / result["pyarrow"]["windows_per_s"])
    assert result["machine"]["cpus"] >= 1 and "ratio" in result["summary"]


def test_bench_tokenizer_compares_the_same_steps(ray_cluster, tmp_path):
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", "tokenizer", "--json", "--subjects", "6", "--rois", "8", "--timepoints", "128",
                                 "--epochs", "2", "--batch-size", "4", "--repeats", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["benchmark"] == "tokenizer" and result["data"]["windows"] == 6 * 4
    ours, base = result["ray_train"]["runs"][0], result["plain_pytorch"]["runs"][0]
    assert ours["steps"] == base["steps"] == 2 * 6 and ours["threads"] == base["threads"]
    assert result["ratio"] == pytest.approx(ours["samples_per_s"] / base["samples_per_s"])


def test_bench_lm_compares_the_same_steps(ray_cluster, tmp_path):
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", "lm", "--json", "--width", "32", "--layers", "1", "--seq-len", "64",
                                 "--micro-batch", "2", "--epochs", "1", "--scans", "4", "--rois", "8", "--variants", "autocast",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    ours, base = result["ray_train_deepspeed"], result["plain_pytorch"]
    assert result["benchmark"] == "lm" and ours["steps"] == base["steps"] > 2 and ours["threads"] == base["threads"]
    assert result["ratio"] == pytest.approx(ours["tokens_per_s"] / base["tokens_per_s"])
    assert ours["peak_rss_mb"] > 0 and base["peak_rss_mb"] > 0 and "mfu" not in result  # no GPU here
    shown = result["variants"]  # one configuration here (the default one runs in every other LM test)
    assert list(shown) == ["autocast"] and ours["precision"] == "autocast" and shown["autocast"]["memory_ratio"] > 0
    assert "autocast (autocast)" in result["summary"]
    bad = CliRunner().invoke(app, ["bench", "lm", "--variants", "auto+turbo"])
    assert bad.exit_code == 2 and "unknown part 'turbo'" in bad.output and "Traceback" not in bad.output


def test_bench_ingest_on_three_loopback_nodes_reports_both_placements(tmp_path):
    """In a fresh process (this one holds the suite's Ray): the pipeline spread over three nodes
    and pinned to the head node, beside the plain read, in one run."""
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "fmrilm", "bench", "ingest", "--json", "--subjects", "8", "--rois", "10", "--timepoints", "96",
                        "--repeats", "1", "--nodes", "3", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["nodes"] == 3 and result["ray_data_head_node"]["windows"] == result["ray_data"]["windows"] == 8 * 3
    assert result["spread_over_head_node"] > 0 and "3 loopback nodes" in result["summary"]
