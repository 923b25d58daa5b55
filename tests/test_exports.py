"""An LM export that is missing or damaged is one line naming it, never a loader's traceback."""

import json
import os

import pytest
from typer.testing import CliRunner

from fmrilm.artifacts import lm
from fmrilm.cli import app
from fmrilm.models.fmri_lm import load_backbone


@pytest.fixture
def full_export(tmp_path):
    model, tok, _ = load_backbone("tiny-gpt2", tiny_width=16, tiny_layers=1)
    d = tmp_path / "export"
    model.save_pretrained(d / "full")
    tok.save_pretrained(d / "full")
    (d / lm.META).write_text(json.dumps({"layout": "full"}))
    return d


def test_a_folder_that_is_not_an_export_is_one_line(tmp_path):
    r = CliRunner().invoke(app, ["lm", "merge", str(tmp_path), str(tmp_path / "out")])
    assert r.exit_code == 2 and "is not an fmrilm model export (no fmri_lm.json)" in r.output and "Errno" not in r.output


def test_a_damaged_export_is_one_line(full_export):
    model, _, meta = lm.load_exported(str(full_export))
    assert meta["layout"] == "full" and model is not None
    weights = full_export / "full" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(lm.ExportDamaged, match=r"cannot be loaded as the 'full' export its fmri_lm.json describes .*re-run the stage"):
        lm.load_exported(str(full_export))
    os.remove(weights)
    with pytest.raises(lm.ExportDamaged):
        lm.load_exported(str(full_export))


def test_an_export_s_run_name():
    from fmrilm.artifacts.lm import run_of

    assert run_of("s3://b/runs/vlm-llava/model") == run_of("./runs/vlm-llava/model/") == "vlm-llava"
    assert run_of("/exports/my-arm") == "my-arm"  # a folder not named model: its own name
