"""The tokenizer stage on Ray Train: 2 CPU workers (DDP + gradient reversal), checkpoint, a fault,
resume by run name at the checkpoint's step; then the tokenize job's determinism."""

import os

import pytest
import torch

from fmrilm.data.ingest import ingest_synthetic
from fmrilm.data.pipeline import PipelineSpec
from fmrilm.data.synth import SynthParams
from fmrilm.models.tokenizer import TokenizerConfig
from fmrilm.train.optim import OptimSpec
from fmrilm.train.specs import RunSpec, ScalingSpec
from fmrilm.artifacts.tokenizer import load_tokenizer
from fmrilm.train.tokenizer import TokenizerStageSpec, run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stage_data(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    ingest_synthetic(SynthParams(name="toktest", subjects=16, n_rois=12, n_networks=4, n_timepoints=64, seed=2), str(root / "datasets"))
    return root


def _spec(root, name, **train):
    return TokenizerStageSpec(
        data=PipelineSpec(root=str(root / "datasets"), window=32, stride=32, split={"fractions": {"train": 0.75, "val": 0.25}}),
        model=TokenizerConfig(patch=16, width=16, heads=2, depth=1, code_dim=8, num_codes=32),
        train=OptimSpec(epochs=3, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=4, log_every=2, **train),
        scaling=ScalingSpec(num_workers=2, cpus_per_worker=0.5),
        run=RunSpec(storage=str(root / "runs"), name=name, logger="tensorboard", log_dir=str(root / "tb")),
    )


def test_two_workers_fault_then_resume_at_the_checkpoint(stage_data, monkeypatch):
    spec = _spec(stage_data, "resume")
    monkeypatch.setenv("FMRILM_FAULT_STEP", "6")
    with pytest.raises(Exception, match="injected fault at step 6"):
        run(spec)
    ckpts = sorted(d for d in os.listdir(stage_data / "runs" / "resume") if d.startswith("checkpoint_0"))
    assert ckpts[-1] == "checkpoint_0000004"
    saved = torch.load(stage_data / "runs" / "resume" / ckpts[-1] / "state.pt", weights_only=False)
    monkeypatch.delenv("FMRILM_FAULT_STEP")
    result = run(spec)  # same spec, same run name: resumes
    m = result["metrics"]
    assert m["resumed_from_step"] == 4
    assert m["resumed_codebook_sum"] == pytest.approx(float(saved["model"]["tokenizer.quantizer.codebook"].sum()), rel=1e-6)
    assert m["step"] > 6 and "val/r2" in m and "val/domain_acc" in m and 0 <= m["val/used_fraction"] <= 1
    assert -1 <= m["val/fc_preservation"] <= 1 and m["val/fc_preservation"] != 0  # whole-scan FC of the decoded signal vs the input
    assert "domain_loss" in m and m["codebook/num_codes"] == 32
    model, cfg = load_tokenizer(result["artifact"])
    assert cfg["step"] == m["step"] and model.quantizer.num_codes == 32
    for f in ("config.json", "model.safetensors", "alignment.safetensors", "codebook_stats.json"):
        assert (stage_data / "runs" / "resume" / "tokenizer" / f).exists()
    assert any((stage_data / "tb" / "resume").iterdir())  # TensorBoard events


def test_tokenize_is_deterministic(stage_data):
    from fmrilm.artifacts.tokens import read_tokens
    from fmrilm.tokens import TokenizeSpec
    from fmrilm.tokens import run as tokenize

    artifact = str(stage_data / "runs" / "resume" / "tokenizer")
    if not os.path.exists(artifact):
        pytest.skip("needs the trained artifact of the previous test")
    data = PipelineSpec(root=str(stage_data / "datasets"))
    a = tokenize(TokenizeSpec(tokenizer=artifact, data=data, out=str(stage_data / "tokens_a")))
    b = tokenize(TokenizeSpec(tokenizer=artifact, data=data, out=str(stage_data / "tokens_b"), batch_size=7))
    ta, tb = read_tokens(a["tokens"]), read_tokens(b["tokens"])
    assert len(ta) == a["windows"] == 16 * 2
    assert (ta["n_rois"] == 12).all() and (ta["n_patches"] == 2).all()
    assert ta["scan_id"].tolist() == tb["scan_id"].tolist()
    assert all((x == y).all() for x, y in zip(ta["codes"], tb["codes"]))
    assert max(int(c.max()) for c in ta["codes"]) < 32


def test_a_dataset_of_another_atlas_is_refused_unless_mapped_by_position(stage_data):
    """The artifact records its input contract; `fmrilm tokenizer eval` on scans of another ROI
    set (same count, other labels), another ROI count or another TR fails with one line naming
    both, before any window is read; position mapping is an explicit opt-in that evaluates."""
    import json

    from typer.testing import CliRunner

    from fmrilm.cli import app

    artifact = stage_data / "runs" / "resume" / "tokenizer"
    if not artifact.exists():
        pytest.skip("needs the trained artifact of the first test")
    contract = json.loads((artifact / "config.json").read_text())["contract"]
    assert contract["atlas"] == "synthetic-12" and len(contract["roi_labels"]) == 12 and contract["tr"] == [2.0]
    assert contract["datasets"].keys() == {"toktest"} and contract["patch"] == 16 and contract["target_tr"] is None
    assert set(contract["signal"]) == {"spread", "lag1", "extreme"} and contract["signal"]["lag1"]["sd"] > 0
    assert "atlas `synthetic-12`, 12 ROIs" in (artifact / "README.md").read_text()  # the artifact's card
    other = {"labels": dict(n_rois=12, n_networks=3), "count": dict(n_rois=10, n_networks=4), "tr": dict(n_rois=12, n_networks=4, tr=0.72)}
    for case, params in other.items():
        ingest_synthetic(SynthParams(name=f"other{case}", subjects=4, n_timepoints=64, seed=5, **params), str(stage_data / case))
    runner = CliRunner()

    def tokenizer_eval(case, *extra):
        return runner.invoke(app, ["tokenizer", "eval", str(artifact), "--data", str(stage_data / case), *extra])

    r = tokenizer_eval("labels")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    line = " ".join(r.output.split())
    assert "dataset 'otherlabels' is atlas 'synthetic-12' (12 ROIs)" in line and "other ROI names or order" in line
    assert "data.atlas_mapping=position" in line
    r = tokenizer_eval("count")
    assert r.exit_code == 2 and "atlas 'synthetic-10' (10 ROIs)" in " ".join(r.output.split()), r.output
    r = tokenizer_eval("tr")
    assert r.exit_code == 2 and "has TR [0.72] s" in " ".join(r.output.split()) and "data.target_tr" in r.output, r.output
    r = tokenizer_eval("labels", "--atlas-mapping", "position", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.output[r.output.index("{"):])
    assert result["r2"] <= 1 and any("read by position" in w for w in result["input_warnings"])
