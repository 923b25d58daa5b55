"""Stage 2: joint fMRI/text pretraining of a Hugging Face causal LM with DeepSpeed on Ray Train.

Driver: checks the spec before any worker starts (backbone, codebook size, LoRA targets), builds
the training sequences from the tokens table (``fmrilm tokenize``) and the captions (``fmrilm
features build``) of the training-split scans (fMRI->fMRI, fMRI->text, text->text; packed to
``seq_len``; see :mod:`fmrilm.data.lm_sequences`), and runs a ``TorchTrainer``. With
``scan_token`` (the default) every fMRI block carries its scan's vector
(:mod:`fmrilm.models.scan_token`), standardised with the training scans' statistics.

Worker: loads the backbone (identically on every rank), adds the fMRI vocabulary and initialises
its embeddings, optionally wraps it in LoRA (peft; the new token rows stay trainable) and in
:class:`~fmrilm.models.fmri_lm.FMRIInputLM` (features projector, scan-token projector), hands it
to the shared DeepSpeed loop (:func:`fmrilm.train.loop.deepspeed_train`; ZeRO 0-3,
:mod:`fmrilm.train.deepspeed`), which trains with the block-causal mask and per-objective losses. Every ``checkpoint_every`` steps every rank saves its
DeepSpeed shard and reports it; re-running the same run name resumes from the newest one. At the
end the model is exported as a Hugging Face folder under ``<storage>/<run>/model`` (ZeRO-3
parameters gathered first): the full model, or with LoRA ``base/`` + ``adapter/`` (merge with
``fmrilm lm merge``), plus ``fmri_lm.json`` and ``probe.pt`` (inputs and logits of the trained
model, so any reload can be checked against it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from fmrilm import runtime
from fmrilm.artifacts import lm as lm_artifact
from fmrilm.config import ConfigError, StageSpec, Strict
from fmrilm.data import splits
from fmrilm.data.lm_sequences import F2F, F2T, OBJECTIVES, T2T, fmri_to_fmri, fmri_to_text, pack, steps_that_fit, text_to_text
from fmrilm.data.pipeline import DataSpec, PipelineError
from fmrilm.data.splits import SplitPolicy
from fmrilm.models.fmri_lm import (INPUT_KEYS, MAX_CODES, BackboneError, FMRIInputLM, add_fmri_vocab, init_code_embeddings, load_backbone,
                                   locate_backbone)
from fmrilm.models.lora import LoraSpec, lora_targets, wrap_lora
from fmrilm.models.scan_token import scan_vectors
from fmrilm.train.checkpoints import DEEPSPEED_GLOBALS, shape_of
from fmrilm.train.faults import fault_plan
from fmrilm.train.optim import OptimSpec
from fmrilm.train.specs import RunSpec, ScalingSpec, worker_spec
from fmrilm.train.trainer import run_trainer
from fmrilm.train.deepspeed import DeepSpeedSpec
from fmrilm.train.loop import deepspeed_train, write_export

log = logging.getLogger("fmrilm.lm")
class BackboneSpec(Strict):
    """Which causal LM: a built-in tiny decoder (not pretrained), a pretrained LM shipped in a
    wheel (offline), a folder, a URI or a hub id."""

    source: str = Field("tiny-gpt2", description="tiny-gpt2 | tiny-llama | tiny-qwen | smollm2-135m | local folder | s3://... | hub id")
    tiny_width: int = Field(64, ge=8, description="hidden size of a built-in decoder")
    tiny_layers: int = Field(2, ge=1, description="layers of a built-in decoder")
    cache_dir: str | None = Field(None, description="where copies and conversions of backbones live on each node "
                                                    "(default: FMRILM_CACHE, else ~/.cache/fmrilm)")


class ObjectiveWeights(Strict):
    """``L = fmri_text * L_f->t + fmri_fmri * L_f->f + text_text * L_t->t`` (fMRI-LM's weights)."""

    fmri_text: float = Field(1.0, ge=0)
    fmri_fmri: float = Field(0.1, ge=0)
    text_text: float = Field(0.5, ge=0)

    def by_id(self) -> dict[int, float]:
        return {F2F: self.fmri_fmri, F2T: self.fmri_text, T2T: self.text_text}


class PretrainSpec(StageSpec):
    """Spec of ``jobs/pretrain.yaml``."""

    kind: Literal["pretrain"] = "pretrain"
    tokenizer: str = Field("./fmrilm-data/runs/tokenizer/tokenizer", description="tokenizer artifact URI")
    tokens: str | None = Field(None, description="tokens table URI (default: <tokenizer>/../tokens)")
    data: DataSpec = DataSpec()
    backbone: BackboneSpec = BackboneSpec()
    input_mode: Literal["tokens", "features"] = Field(
        "tokens", description="tokens: codes as input vocabulary (the poster); features: encoder features through a projector (NeuroLM/fMRI-LM)")
    scan_token: bool = Field(True, description="add a scan-level token to every fMRI block: the whole scan's encoder-feature "
                             "connectivity (fmrilm.models.scan_token), standardised on the training scans, through a learned projector")
    objectives: ObjectiveWeights = ObjectiveWeights()
    seq_len: int = Field(256, ge=16)
    lora: LoraSpec = LoraSpec()
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    train: OptimSpec = OptimSpec(epochs=2, lr=5e-4, warmup_steps=5, checkpoint_every=50, log_every=5)
    scaling: ScalingSpec = ScalingSpec(num_workers=2, cpus_per_worker=0.5)
    run: RunSpec = RunSpec(name="pretrain")


# ---------------------------------------------------------------- driver side: checks


def _skeleton(spec: PretrainSpec):
    """The backbone's module tree on the meta device (no weights), for checking LoRA targets."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fmrilm.models.fmri_lm import minilm_tokenizer, backbone_path, builtin_config

    kind, where = locate_backbone(spec.backbone.source)
    if kind == "builtin":
        tok = minilm_tokenizer()
        cfg = builtin_config(where, len(tok), tok, spec.backbone.tiny_width, spec.backbone.tiny_layers)
    else:
        path = backbone_path(spec.backbone.source, spec.backbone.cache_dir)
        try:
            cfg = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise BackboneError(f"backbone {spec.backbone.source}: cannot read its config: {err}") from err
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def check_inputs(contract: dict | None, data: str, datasets: list[str] | None, model: str) -> None:
    """The datasets an LM stage names (``datasets``; with none named, the tokens table decides what
    it reads, and tokenize checked that) against the tokenizer's input contract: another ROI count
    or an unseen TR raises; another ROI naming, let through by the tokens table's
    ``atlas_mapping``, is logged."""
    from fmrilm.data.contract import check_datasets
    from fmrilm.data.table import find_datasets

    if not datasets:
        return
    manifests = [m for _, m in find_datasets(data, datasets)]
    for warning in check_datasets(contract, manifests, model, "position", (contract or {}).get("target_tr")):
        log.warning(warning)


def check(spec: PretrainSpec) -> dict:
    """Every check that can fail before a worker starts; returns the tokenizer artifact's config."""
    from fmrilm.artifacts.tokenizer import read_config
    from fmrilm.artifacts.tokens import fc_encoder

    locate_backbone(spec.backbone.source)
    cfg = read_config(spec.tokenizer)
    layout = cfg["model"].get("layout", "roi")
    if spec.scan_token and layout != "roi":
        raise ConfigError(f"the scan token is the connectivity of per-ROI encoder features, and the tokenizer {spec.tokenizer} "
                          f"has whole-brain tokens (model.layout={layout}): set scan_token=false")
    if spec.input_mode == "features" and fc_encoder(cfg):
        raise ConfigError(f"input_mode=features reads learned encoder features, and the tokenizer {spec.tokenizer} codes the "
                          "window's correlations themselves (model.encoder=fc): set input_mode=tokens")
    check_inputs(cfg.get("contract"), spec.data.root, spec.data.datasets, f"tokenizer {spec.tokenizer}")
    k = cfg["model"]["num_codes"]
    if k > MAX_CODES:
        raise BackboneError(f"the tokenizer has {k} codes; the fMRI vocabulary allows at most {MAX_CODES}")
    skeleton = _skeleton(spec)
    if spec.lora.enabled:
        lora_targets(spec.lora, skeleton)
    if spec.seq_len > getattr(skeleton.config, "max_position_embeddings", getattr(skeleton.config, "n_positions", 10**9)):
        raise BackboneError(f"seq_len {spec.seq_len} exceeds the backbone's maximum positions")
    return cfg


# ---------------------------------------------------------------- driver side: sequences


def build_examples(codes: dict[str, np.ndarray], captions: dict[str, list[str]], tokenizer, vocab, seq_len: int,
                   weights: ObjectiveWeights, feats: dict[str, np.ndarray] | None = None,
                   scans: dict[str, np.ndarray] | None = None) -> list:
    """fMRI->fMRI chunks of every scan, fMRI->text pairs (each caption with a chunk of its scan)
    and text->text captions, in a fixed interleaved order; objectives with weight 0 are left out.
    With ``feats`` (features input mode) every fMRI example carries its encoder features, with
    ``scans`` (scan_id -> scan vector) its scan's vector."""
    ids_of = {"first_code_id": vocab.first_code_id, "open_id": vocab.open_id, "close_id": vocab.close_id}
    examples = []
    for scan_id in sorted(codes):
        c = codes[scan_id]
        f = feats.get(scan_id) if feats else None
        vec = scans.get(scan_id) if scans else None
        rois = c.shape[0]
        s = steps_that_fit(rois, seq_len)
        if s < 2:
            raise ConfigError(f"seq_len {seq_len} holds fewer than 2 time steps of {rois} ROIs (scan {scan_id}): raise seq_len")

        def chunk(start: int, steps: int):
            return c[:, start : start + steps], (f[:, start : start + steps] if f is not None else None)

        starts = [i for i in range(0, c.shape[1] - 1, s) if chunk(i, s)[0].shape[1] >= 2] or [0]
        if weights.fmri_fmri > 0:
            for i in starts:
                cc, ff = chunk(i, s)
                if cc.shape[1] >= 2:
                    examples.append(fmri_to_fmri(cc, **ids_of, feats=ff, scan=vec))
        for j, caption in enumerate(captions.get(scan_id, [])):
            ids = np.asarray(tokenizer(caption, add_special_tokens=False)["input_ids"], np.int64)
            steps = steps_that_fit(rois, seq_len, extra=len(ids) + 1)
            if weights.fmri_text > 0 and steps >= 1:
                cc, ff = chunk(starts[j % len(starts)], steps)
                examples.append(fmri_to_text(cc, ids, **ids_of, eos_id=tokenizer.eos_token_id, feats=ff, scan=vec))
            if weights.text_text > 0 and len(ids) + 2 <= seq_len:
                examples.append(text_to_text(ids, tokenizer.bos_token_id, tokenizer.eos_token_id))
    return examples


def training_split(spec: PretrainSpec, art_cfg: dict) -> tuple[dict[str, str], dict]:
    """``(scan_id -> split, split record)``: the spec's policy, else the tokenizer's; refuses to
    validate on subjects that trained the tokenizer or the features build (captions)."""
    from fmrilm.data.pipeline import PipelineSpec, dataset_versions, scan_index, selected_datasets
    from fmrilm.features.store import features_split

    data = PipelineSpec(root=spec.data.root, datasets=spec.data.datasets, split=splits.inherited(spec.data.split, art_cfg.get("split")))
    found = selected_datasets(data)
    index = scan_index(data, found)
    upstream = {f"the tokenizer {spec.tokenizer}": art_cfg.get("split"), f"the features build of {spec.data.root}": features_split(spec.data.root, spec.data.datasets)}
    record = splits.stage_record(data.split, index, upstream, "validated on", dataset_versions(found))
    return dict(zip(index["scan_id"], index["split"])), record


def prepare_sequences(spec: PretrainSpec, art_cfg: dict) -> dict:
    """Packed train (and val) sequences, padded so every rank gets the same number of rows, the
    run's split record (``split``) and, with the scan token, the training scans' standardisation
    of scan vectors (``scan_scale``: ``(mean, std)``)."""
    from fmrilm.features.store import read_captions
    from fmrilm.models.scan_token import standardiser
    from fmrilm.artifacts.tokens import scan_codes, token_hop, tokens_for

    tokens, tokens_uri = tokens_for(spec.tokenizer, spec.tokens, need_features=spec.input_mode == "features" or spec.scan_token)
    split, record = training_split(spec, art_cfg)
    tokens = tokens[tokens["scan_id"].isin(split)]
    captions = read_captions(spec.data.root, spec.data.datasets)
    if spec.objectives.fmri_text > 0 and not captions:
        log.warning("no captions under %s: fMRI->text and text->text objectives have no data (run `fmrilm features build`)", spec.data.root)
    from fmrilm.models.fmri_lm import extend_tokenizer

    tok = text_tokenizer(spec)
    vocab = extend_tokenizer(tok, art_cfg["model"]["num_codes"])  # the same ids the workers' add_fmri_vocab assigns
    codes, feats = scan_codes(tokens, token_hop(art_cfg))
    vectors = scan_vectors(feats) if spec.scan_token else {}
    feats = feats if spec.input_mode == "features" else {}
    world = spec.scaling.num_workers
    out = {"split": record}
    if vectors:
        train_vecs = [v for s, v in vectors.items() if split.get(s) == "train"]
        if len({len(v) for v in vectors.values()}) > 1:
            raise PipelineError("the scan token needs one ROI count across the scans of a run (a single atlas): "
                                "select datasets of one atlas, or set scan_token=false")
        out["scan_scale"] = standardiser(np.stack(train_vecs)) if train_vecs else None
    for name in ("train", "val"):
        ids = {s for s, sp in split.items() if sp == name}
        ex = build_examples({k: v for k, v in codes.items() if k in ids}, {k: v for k, v in captions.items() if k in ids},
                            tok, vocab, spec.seq_len, spec.objectives, {k: v for k, v in feats.items() if k in ids},
                            {k: v for k, v in vectors.items() if k in ids})
        if not ex:
            continue
        packed = pad_rows(pack(ex, spec.seq_len, tok.pad_token_id), world, tok.pad_token_id)
        out[name] = {"packed": packed, "examples": len(ex), "counts": {o: sum(int((e.objective == i).any()) for e in ex) for i, o in enumerate(OBJECTIVES)}}
    if "train" not in out:
        raise PipelineError(f"no training sequences: the tokens table {tokens_uri} has no scans of the training split")
    return out


def pad_rows(packed: dict[str, np.ndarray], world: int, pad_id: int) -> dict[str, np.ndarray]:
    """Append empty rows (no targets, one padding segment) so the row count divides ``world``."""
    pad = (-len(packed["ids"])) % world
    if not pad:
        return packed
    fill = {"ids": pad_id, "targets": -100, "groups": 0, "positions": 0, "objective": -1, "segments": 0, "feats": 0, "roi": -1,
            "scan": 0, "scan_pos": -1}
    return {k: np.concatenate([v, np.full((pad, *v.shape[1:]), fill[k], v.dtype)]) for k, v in packed.items()}


def text_tokenizer(spec: PretrainSpec):
    """The backbone's tokenizer alone (no weights), with a pad token."""
    from transformers import AutoTokenizer

    from fmrilm.models.fmri_lm import minilm_tokenizer, backbone_path

    kind, _ = locate_backbone(spec.backbone.source)
    if kind == "builtin":
        return minilm_tokenizer()
    tok = AutoTokenizer.from_pretrained(backbone_path(spec.backbone.source, spec.backbone.cache_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def probe_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The first packed row's model inputs: what an export's ``probe.pt`` replays."""
    return {k: v[:1] for k, v in packed.items() if k in ("ids", "segments", "groups", "positions", *INPUT_KEYS)}


def to_dataset(packed: dict[str, np.ndarray]):
    """A Ray Dataset with one packed row per record (tensor columns)."""
    import ray

    n = len(packed["ids"])
    return ray.data.from_items([{k: v[i] for k, v in packed.items()} for i in range(n)])


# ---------------------------------------------------------------- worker side


def build_model(spec: PretrainSpec, num_codes: int, codebook: torch.Tensor, pairs=None):
    """Backbone + fMRI vocabulary with initialised rows; returns ``(model, tokenizer, vocab, info)``."""
    model, tok, info = load_backbone(spec.backbone.source, seed=spec.train.seed, tiny_width=spec.backbone.tiny_width,
                                     tiny_layers=spec.backbone.tiny_layers, cache_dir=spec.backbone.cache_dir)
    vocab = add_fmri_vocab(model, tok, num_codes)
    info["code_init"] = init_code_embeddings(model, vocab, codebook, pairs, seed=spec.train.seed)
    if spec.deepspeed.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model, tok, vocab, info


def train_loop(config: dict) -> None:
    """Ray Train worker: the LM training loop (see the module docstring)."""
    import ray.train

    spec = PretrainSpec(**config["spec"])
    rank = ray.train.get_context().get_world_rank()
    pairs = tuple(torch.from_numpy(p.copy()) for p in config["pairs"]) if config.get("pairs") is not None else None
    model, tok, vocab, info = build_model(spec, config["num_codes"], torch.from_numpy(config["codebook"].copy()), pairs)
    # with LoRA: the vocabulary-extended, initialised model the adapters train on, copied into the
    # export as base/ (a pretrained backbone is hundreds of MB: removed however the run ends)
    with tempfile.TemporaryDirectory(prefix="fmrilm-base-") if spec.lora.enabled else contextlib.nullcontext() as export_base:
        if spec.lora.enabled:
            if rank == 0:
                model.save_pretrained(export_base)
                tok.save_pretrained(export_base)
            model = wrap_lora(spec.lora, model, vocab.new_ids())
        if spec.input_mode == "features" or spec.scan_token:
            model = FMRIInputLM(model, config["feature_width"] if spec.input_mode == "features" else None, config["max_rois"],
                                config.get("scan_dim"))
            if config.get("scan_scale") is not None:
                model.set_scan_scale(*config["scan_scale"])
        static = {"code_init": info["code_init"], "pretrained_backbone": info["pretrained"]}
        engine = deepspeed_train(spec, model, config, OBJECTIVES, spec.objectives.by_id(), static, config["shape"])
        export(engine, tok, spec, info, vocab, config["probe"], export_base, rank, config.get("split"), config.get("contract"))


def export(engine, tok, spec: PretrainSpec, info: dict, vocab, probe: dict, base_dir: str | None, rank: int,
           split_rec: dict | None = None, contract: dict | None = None) -> None:
    """Write the Hugging Face folder (see the module docstring; ``fmri_lm.json`` carries the split
    record and the tokenizer's input contract); every rank takes part (ZeRO-3 gathers)."""
    def write(d: str, lm) -> dict:
        if spec.lora.enabled:
            lm.save_pretrained(os.path.join(d, "adapter"))
            shutil.copytree(base_dir, os.path.join(d, "base"))
        else:
            lm.save_pretrained(os.path.join(d, "full"), state_dict={k: v.detach().cpu().clone() for k, v in lm.state_dict().items()})
            tok.save_pretrained(os.path.join(d, "full"))
        return {"backbone": info, "vocab": vars(vocab), "lora": spec.lora.enabled, "seq_len": spec.seq_len,
                "layout": "base+adapter" if spec.lora.enabled else "full", "tokenizer": spec.tokenizer, "input_mode": spec.input_mode,
                "split": split_rec, "contract": contract}

    write_export(engine, spec.deepspeed.zero_stage, probe, rank, lm_artifact.location(spec.run.storage, spec.run.name), write)


# ---------------------------------------------------------------- driver entry


def run(spec: PretrainSpec) -> dict:
    """Check, build sequences, train (or resume), export; returns metrics, counts and the model URI."""
    from fmrilm.artifacts.tokenizer import codebook

    art_cfg = check(spec)
    runtime.init_ray()
    prepared = prepare_sequences(spec, art_cfg)
    train = prepared["train"]
    policy = splits.inherited(spec.data.split, art_cfg.get("split"))
    result = fit(spec, train["packed"], codebook(spec.tokenizer), code_pairs(spec, policy), art_cfg["model"]["max_rois"], prepared["split"],
                 prepared.get("scan_scale"), art_cfg.get("contract"), val=(prepared.get("val") or {}).get("packed"))
    return {"metrics": dict(result.metrics or {}), "model": lm_artifact.location(spec.run.storage, spec.run.name),
            "sequences": len(train["packed"]["ids"]), "examples": train["examples"], "objective_examples": train["counts"]}


def code_pairs(spec: PretrainSpec, policy: SplitPolicy | None = None, max_windows: int = 256):
    """Paired examples for mapping the codebook into the text space the tokenizer was aligned to:
    ``(code vectors [n, code_dim], projected encoder features [n, text_dim])`` over up to
    ``max_windows`` training windows (split by ``policy``), each encoder token paired with its
    nearest code; ``None`` (the reason logged) when the artifact has no alignment head or no
    training windows."""
    import torch.nn.functional as F

    from fmrilm.artifacts import tokenizer as artifact
    from fmrilm.data.pipeline import PipelineSpec, build_windows

    objective, cfg = artifact.load_objective(spec.tokenizer)
    if objective.align is None:
        log.info("codebook init: the tokenizer has no alignment head; fMRI rows start as a random projection of the codebook")
        return None
    runtime.init_ray()
    ds, n = build_windows(artifact.windows_like(PipelineSpec(root=spec.data.root, datasets=spec.data.datasets, split=policy), cfg), "train")
    if n == 0:
        log.info("codebook init: no training windows; fMRI rows start as a random projection of the codebook")
        return None
    tok = objective.tokenizer
    xs, ys = [], []
    with torch.no_grad():
        for batch in ds.limit(max_windows).iter_batches(batch_size=64, batch_format="numpy"):
            x = torch.from_numpy(np.require(batch["x"], np.float32, ["C", "W"]))
            feats = tok.encode(x).reshape(-1, tok.cfg.width)
            codes = tok.quantizer.nearest(F.normalize(tok.to_code(feats), dim=-1))
            xs.append(tok.quantizer.codebook[codes])
            ys.append(objective.align.project(feats))
    return torch.cat(xs), torch.cat(ys)


def fit(spec: PretrainSpec, packed: dict[str, np.ndarray], codebook: torch.Tensor, pairs=None, max_rois: int = 512,
        split_rec: dict | None = None, scan_scale: tuple[np.ndarray, np.ndarray] | None = None, contract: dict | None = None,
        val: dict[str, np.ndarray] | None = None):
    """Run the ``TorchTrainer`` on packed sequences (rows a multiple of the world size) with a
    codebook ``[K, d]``, optional codebook-map pairs, the split record and input contract the
    export carries and the scan vectors' standardisation; ``val``: packed sequences of the
    validation subjects, scored at each checkpoint (``val/loss``). Returns the Ray Train result."""
    world = spec.scaling.num_workers
    probe = probe_row(packed)
    config = {"spec": worker_spec(spec), "num_codes": int(codebook.shape[0]), "codebook": codebook.numpy(),
              "pairs": tuple(p.numpy() for p in pairs) if pairs is not None else None,
              "rows_per_rank": math.ceil(len(packed["ids"]) / world), "probe": probe,
              "fault": fault_plan(),
              "feature_width": int(packed["feats"].shape[-1]) if "feats" in packed else None, "max_rois": max_rois,
              "scan_dim": int(packed["scan"].shape[-1]) if "scan" in packed else None, "scan_scale": scan_scale,
              "split": split_rec, "contract": contract, "has_val": val is not None}
    config["shape"] = model_shape(PretrainSpec(**config["spec"]), config["num_codes"])  # as the workers see the spec
    datasets = {"train": to_dataset(packed)} | ({"val": to_dataset(val)} if val is not None else {})
    return run_trainer(train_loop, config, spec.scaling, datasets, spec.run, (split_rec or {}).get("datasets"), config["shape"],
                       DEEPSPEED_GLOBALS)


def model_shape(spec: PretrainSpec, num_codes: int) -> dict:
    """The spec keys that size the model, recorded in every checkpoint: a resume with others is refused."""
    return shape_of(backbone=spec.backbone, input_mode=spec.input_mode, scan_token=spec.scan_token, lora=spec.lora, num_codes=num_codes)


def summary(result: dict) -> list[str]:
    """Lines a person reads after :func:`run`; the first is the headline (losses per objective)."""
    m = result["metrics"]
    losses = ", ".join(f"{k} {m[k]:.3f}" for k in ("loss/fmri_text", "loss/fmri_fmri", "loss/text_text", "loss", "val/loss", "tokens_per_s") if k in m)
    trained = f"{losses} (step {m.get('step')})" if m.get("step") != 0 else "not trained (train.max_steps=0): the initialised model, exported"
    lines = [trained,
             f"model: {result['model']} ({result['sequences']} packed sequences, examples per objective {result['objective_examples']}; "
             f"code embeddings init: {m.get('code_init')})"]
    if m.get("pretrained_backbone") is False:
        lines.append("warning: the backbone was a built-in decoder, not pretrained: set backbone.source to a real model for science")
    return lines
