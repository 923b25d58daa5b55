"""fmrilm's tokenizers as Brainmarks models: the export checks the input space, and Brainmarks'
own model test passes on a tiny export."""

import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fmrilm.artifacts import brainmarks as bm
from fmrilm.artifacts import tokenizer as artifact
from fmrilm.cli import app
from fmrilm.data.contract import input_contract
from fmrilm.models.alignment import AlignmentConfig
from fmrilm.models.scan_token import scan_vector
from fmrilm.models.tokenizer import TokenizerConfig
from fmrilm.models.tokenizer_objective import TokenizerObjective


def tiny_export(path, rois: int = 400, atlas: str = "schaefer400", target_tr: float | None = 2.0, layout: str = "roi") -> str:
    """A tiny untrained tokenizer written as a training run writes its artifact."""
    torch.manual_seed(0)
    patch, stride = (16, 4) if layout == "connectivity" else (4, 16)  # a connectivity token covers the window, one every stride
    model = TokenizerConfig(layout=layout, patch=patch, width=16, depth=1, heads=2, code_dim=8, num_codes=16, max_rois=rois, max_patches=8)
    objective = TokenizerObjective(model, AlignmentConfig(domain_weight=0, contrastive_weight=0), 8)
    manifest = {"dataset": "tiny", "atlas": atlas, "n_rois": rois, "tr": [0.72], "version": "v1"}
    cfg = {"model": asdict(model), "alignment": asdict(AlignmentConfig(domain_weight=0, contrastive_weight=0)), "text_dim": 8,
           "data": {"window": 16, "stride": stride, "normalise": True, "target_tr": target_tr}, "step": 0, "run": "tiny", "split": None,
           "contract": input_contract([manifest], 16, stride, patch, True, target_tr)}
    return artifact.write(str(path), objective.eval(), cfg)


SPACES = {"schaefer400": 400, "a424": 424}


def test_the_export_checks_the_space(tmp_path):
    uri = tiny_export(tmp_path / "tok")
    rec = bm.record(uri, "tiny", "schaefer400", SPACES)
    assert rec["model"] == "fmrilm_tiny" and rec["tr"] == 2.0 and rec["n_rois"] == 400
    with pytest.raises(bm.BrainmarksError, match=r"reads 400 ROIs \(atlas 'schaefer400'\) but Brainmarks' space 'a424' has 424"):
        bm.record(uri, "tiny", "a424", SPACES)
    with pytest.raises(bm.BrainmarksError, match="letters, digits and _ only"):
        bm.record(uri, "my-model", "schaefer400", SPACES)
    assert bm.record(uri, "tiny", None, SPACES)["space"] == "schaefer400"  # the tokenizer's own atlas
    with pytest.raises(bm.BrainmarksError, match="not a Brainmarks input space"):
        bm.record(uri, "tiny", "aal2", SPACES)
    other = tiny_export(tmp_path / "other", atlas="my-400-parcels")
    with pytest.raises(bm.BrainmarksError, match="--atlas-mapping position"):
        bm.record(other, "tiny", "schaefer400", SPACES)
    assert bm.record(other, "tiny", "schaefer400", SPACES, atlas_mapping="position")["atlas"] == "my-400-parcels"
    native = tiny_export(tmp_path / "native", target_tr=None)
    assert bm.record(native, "tiny", "schaefer400", SPACES)["tr"] == 0.72  # one native TR: its patches' duration
    state = tiny_export(tmp_path / "state", layout="state")
    with pytest.raises(bm.BrainmarksError, match="whole-brain tokens .* model.layout=roi"):
        bm.record(state, "tiny", "schaefer400", SPACES)


def test_transform_and_encoder_give_brainmarks_embeddings(tmp_path):
    rec = bm.record(tiny_export(tmp_path / "tok", rois=12, atlas="s12"), "t", "s12", {"s12": 12})
    transform, model = bm.load(rec)
    rng = np.random.default_rng(0)
    bold = torch.from_numpy(rng.standard_normal((90, 12)).astype(np.float32))  # 90 frames at TR 1 s -> 45 at 2 s -> 2 windows
    sample = transform({"bold": bold, "tr": 1.0, "mean": torch.zeros(1, 12), "std": torch.ones(1, 12)})
    assert sample["windows"].shape == (2, 12, 16)
    short = transform({"bold": bold[:10], "tr": 1.0})  # shorter than a window: padded to one
    assert short["windows"].shape == (1, 12, 16)
    cls, reg, patch = model({"windows": torch.stack([sample["windows"], sample["windows"]])})
    assert cls.shape == (2, 1, 66) and reg is None and patch.shape == (2, 12, 16)
    _, feats = model.tokenizer.tokenize_with_features(sample["windows"])  # [2 windows, rois, 4 patches, width]
    steps = feats.permute(1, 0, 2, 3).reshape(12, 8, 16).numpy()
    np.testing.assert_allclose(cls[0, 0].numpy(), scan_vector(steps), atol=1e-5)
    with pytest.raises(bm.BrainmarksError, match="reads 12 ROIs"):
        transform({"bold": bold[:, :10], "tr": 1.0})


def test_brainmarks_own_model_test_passes_on_a_tiny_export(tmp_path, monkeypatch):
    pytest.importorskip("brainmarks.readers", reason="Brainmarks is installed by `make test` (Makefile: BRAINMARKS_STAMP)")
    monkeypatch.setenv(bm.REGISTRY_ENV, str(tmp_path / "registry"))
    uri = tiny_export(tmp_path / "tok")
    r = CliRunner().invoke(app, ["export", "brainmarks", uri, "--name", "tiny"])
    assert r.exit_code == 0, r.output
    assert "registered fmrilm_tiny (schaefer400, 400 ROIs, TR 2 s)" in r.output
    assert os.path.exists(tmp_path / "registry" / "tiny.json")
    r = CliRunner().invoke(app, ["export", "brainmarks", uri, "--name", "tiny", "--space", "a424"])
    assert r.exit_code == 2 and "has 424" in r.output and "Traceback" not in r.output
    test = subprocess.run([sys.executable, "-m", "brainmarks.models.test_models", "fmrilm_tiny"], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env={**os.environ, bm.REGISTRY_ENV: str(tmp_path / "registry")})
    assert test.returncode == 0 and "2 passed" in test.stdout, test.stdout[-3000:] + test.stderr[-2000:]


def test_a_damaged_tokenizer_artifact_is_one_line(tmp_path):
    uri = tiny_export(tmp_path / "tok", rois=12, atlas="s12")
    weights = tmp_path / "tok" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(artifact.ArtifactDamaged, match=r"model.safetensors cannot be read .*train it again"):
        artifact.load_tokenizer(uri)
