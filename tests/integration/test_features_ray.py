"""features build as a Ray Data map on the session's Ray, and the sex probe on planted effects."""

import pytest
from typer.testing import CliRunner

from fmrilm.cli import app
from fmrilm.data.ingest import ingest_synthetic
from fmrilm.data.synth import SynthParams

pytestmark = pytest.mark.integration


def test_features_build_cli_on_ray_with_sex_probe(ray_cluster, local_s3, tmp_path):
    root = local_s3.uri("features", "datasets")
    ingest_synthetic(SynthParams(name="probe", subjects=80, n_rois=21, n_networks=7, n_timepoints=150, sex_effect=0.4, seed=8), root)
    spec = tmp_path / "features.yaml"
    spec.write_text(f"kind: features\ndata: {{root: {root}, split: {{seed: 1, fractions: {{train: 0.6, test: 0.4}}}}}}\nica_components: 6\nplot: true\n")
    r = CliRunner().invoke(app, ["features", "build", str(spec)])
    assert r.exit_code == 0, r.output
    assert "sex probe" in r.stdout
    from fmrilm.features.job import FeaturesSpec, run
    from fmrilm import config

    summary = run(config.load(FeaturesSpec, str(spec)))["probe"]  # up to date: read back, not recomputed
    probe = summary["sex_probe"]
    assert probe["n_test"] >= 20
    assert probe["descriptors_logistic"] > 0.65 and probe["fc_logistic"] > 0.65  # planted effect, clearly above chance
    assert summary["descriptors"] > 100 and summary["captions"] == 3 * 80
