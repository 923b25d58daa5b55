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
