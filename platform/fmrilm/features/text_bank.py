"""The frozen text side of the tokenizer's alignment: a bank of text-token embeddings and one
sentence embedding per scan, both from the captions of a features build."""

from __future__ import annotations

import numpy as np

from fmrilm.data.pipeline import PipelineSpec
from fmrilm.errors import UserError
from fmrilm.models.alignment import AlignmentConfig


def text_inputs(align: AlignmentConfig, data: PipelineSpec, scans: set[str] | None = None) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    """``(token bank [n, text_dim] or None, {scan_id: caption embedding [text_dim]})`` from the
    captions of ``scans`` (the training scans; None: every scan) of the datasets ``data`` selects;
    ``(None, {})`` when ``align`` is off. Caption embeddings only with a contrastive weight."""
    from fmrilm.features.store import read_captions
    from fmrilm.models.text import FALLBACK_CORPUS, embed_texts

    if not align.enabled:
        return None, {}
    captions = {scan: texts[0] for scan, texts in read_captions(data.root, data.datasets).items() if scans is None or scan in scans}
    if align.contrastive_weight > 0 and not captions:
        raise UserError("alignment.contrastive_weight > 0 needs captions: run `fmrilm features build` on these datasets first")
    texts = sorted(set(captions.values()))[:2000] or FALLBACK_CORPUS
    tokens, _ = embed_texts(texts, align.text_source)
    caption_emb = {}
    if align.contrastive_weight > 0:
        ids = sorted(captions)
        _, sentences = embed_texts([captions[i] for i in ids], align.text_source)
        caption_emb = dict(zip(ids, sentences))
    return tokens, caption_emb
