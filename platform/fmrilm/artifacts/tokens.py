"""The tokens table, read: what ``fmrilm tokenize`` (:mod:`fmrilm.tokens`) writes beside a tokenizer
artifact, as every later stage reads it. The table (``tokens_for``, ``read_tokens``), each scan's
codes and encoder features joined along time (``scan_codes``), the signal the tokenizer's decoder
rebuilds from codes (``CodeDecoder``), and a scan's fMRI block in an LM export's vocabulary
(``ScanBlocks``), shuffled at test time where asked (``shuffle_order``)."""

from __future__ import annotations

from typing import Literal

import numpy as np

from fmrilm import storage
from fmrilm.artifacts import tokenizer as artifact
from fmrilm.errors import UserError


class CodeDecoder:
    """``decoder.fc(scan_id, codes [channels, steps])`` -> the FC upper triangle of what the
    tokenizer artifact's decoder (``cfg``: its config) rebuilds from the codes alone: of the
    signal ``[rois, steps * patch]``, or in the connectivity layout the mean of the rebuilt
    windows' correlations (the model is loaded on first use)."""

    def __init__(self, tokenizer_uri: str, cfg: dict, rois: dict[str, int]):
        self.uri, self.rois = tokenizer_uri, rois
        self.num_codes = cfg["model"]["num_codes"]
        self.per_window = cfg["data"]["window"] // cfg["model"]["patch"]
        self.connectivity = window_tokens(cfg)
        self.model = None

    def fc(self, scan_id: str, codes: np.ndarray) -> np.ndarray:
        import torch

        from fmrilm.features.dynamics import fc

        if self.model is None:
            self.model = artifact.load_tokenizer(self.uri)[0]
        c, steps = codes.shape
        n = self.per_window
        windows = torch.from_numpy(np.asarray(codes[:, : steps // n * n], np.int64).reshape(c, -1, n).transpose(1, 0, 2).copy())
        rebuilt = self.model.decode(windows, self.rois[scan_id]).numpy()  # [windows, rois, time] or [windows, rois, rois]
        if self.connectivity:
            mean = rebuilt.mean(0)
            return mean[np.triu_indices(mean.shape[0], 1)]
        return fc(rebuilt.transpose(1, 0, 2).reshape(rebuilt.shape[1], -1))


def scan_rois(tokens) -> dict[str, int]:
    """``scan_id -> ROIs`` of a tokens table (pandas)."""
    return tokens.groupby("scan_id")["n_rois"].first().astype(int).to_dict()


def read_tokens(uri: str):
    """The tokens table as pandas, sorted by (scan_id, start)."""
    import pyarrow.dataset as pads

    loc = storage.resolve(uri)
    t = pads.dataset(loc.path, filesystem=loc.fs, format="parquet", exclude_invalid_files=True).to_table()
    return t.to_pandas().sort_values(["scan_id", "start"]).reset_index(drop=True)


class TokensMissing(UserError, FileNotFoundError):
    """No tokens table where a stage looks for one."""


class ScanNotTokenized(UserError, KeyError):
    """A scan a stage asks about has no rows in the tokens table."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def tokens_for(tokenizer_uri: str, tokens_uri: str | None = None, need_features: bool = False):
    """``(tokens table, its URI)`` of a tokenizer artifact: ``tokens_uri`` or the ``tokens`` folder
    beside the artifact (where ``fmrilm tokenize`` writes it); clear errors when it is missing or
    lacks the encoder features the scan token and the features input mode need."""
    uri = tokens_uri or artifact.tokens_location(tokenizer_uri)
    try:
        tokens = read_tokens(uri)
    except (FileNotFoundError, OSError) as err:
        raise TokensMissing(f"no tokens table at {uri}: run `fmrilm tokenize jobs/tokenize.yaml` first ({err})") from None
    if need_features and "features" not in tokens.columns:
        raise UserError(f"the scan token and the features input mode need encoder features in the tokens table {uri}: "
                         "re-run `fmrilm tokenize jobs/tokenize.yaml features=true`")
    return tokens, uri


def window_tokens(cfg: dict) -> bool:
    """Whether a tokenizer config codes each window whole (the connectivity layout: a token a
    window, windows ``stride`` apart) rather than in patches side by side."""
    return cfg["model"].get("layout") == "connectivity"


def fc_encoder(cfg: dict) -> bool:
    """Whether a tokenizer config codes the window's correlations themselves (``model.encoder=fc``:
    no learned encoder features)."""
    return cfg["model"].get("encoder", "learned") == "fc"


def token_hop(cfg: dict) -> int:
    """Time points between the windows whose codes follow each other in a scan's sequence, for a
    tokenizer config: its window (roi and state layouts: windows side by side), or its stride
    (connectivity layout: a token for every window)."""
    return cfg["data"]["stride"] if window_tokens(cfg) else cfg["data"]["window"]


def scan_codes(tokens, hop: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per scan of a tokens table (pandas), the codes of its windows at least ``hop`` time points
    apart (:func:`token_hop`) joined along time, ``scan_id -> [channels, steps]`` (code indices),
    and, when the table has them, the encoder features the same way, ``scan_id -> [channels,
    steps, width]``."""
    has_feats = "features" in tokens.columns
    channels = "n_channels" if "n_channels" in tokens.columns else "n_rois"  # tables before the state layout
    codes, feats = {}, {}
    for scan_id, group in tokens.sort_values(["scan_id", "start"]).groupby("scan_id", sort=False):
        blocks, fblocks, end = [], [], -1
        for row in group.itertuples(index=False):
            if row.start >= end:
                c = getattr(row, channels)
                blocks.append(np.asarray(row.codes).reshape(c, row.n_patches))
                if has_feats:
                    fblocks.append(np.asarray(row.features, np.float32).reshape(c, row.n_patches, -1))
                end = row.start + hop
        codes[scan_id] = np.concatenate(blocks, axis=1)
        if has_feats:
            feats[scan_id] = np.concatenate(fblocks, axis=1)
    return codes, feats


class ScanBlocks:
    """fMRI blocks of scans for prompts, in the vocabulary of the LM export ``model_uri`` (from
    the tokens table of its tokenizer, or ``tokens_uri``): ``part(scan_id, steps)`` is a
    :func:`~fmrilm.data.lm_sequences.fmri_part` of the scan's first ``steps`` time steps, with
    encoder features in the features input mode and the whole scan's vector when the export
    has the scan token."""

    def __init__(self, model_uri: str, data: str, datasets: list[str] | None, tokens_uri: str | None = None):
        from fmrilm.artifacts.lm import export_meta, root_export
        from fmrilm.models.scan_token import scan_vectors

        meta = export_meta(root_export(model_uri))
        self.vocab = meta["vocab"]
        self.features = meta.get("input_mode") == "features"
        self.scan_token, self.scan_dim = bool(meta.get("scan_dim")), meta.get("scan_dim")
        tokens, self.tokens_uri = tokens_for(meta["tokenizer"], tokens_uri, need_features=self.features or self.scan_token)
        self.tokenizer_cfg = artifact.read_config(meta["tokenizer"])
        self.codes, self.feats = scan_codes(tokens, token_hop(self.tokenizer_cfg))
        self.decoder = CodeDecoder(meta["tokenizer"], self.tokenizer_cfg, scan_rois(tokens))
        self.vectors = scan_vectors(self.feats) if self.scan_token else {}

    def seen_timepoints(self, steps: int) -> dict | None:
        """What a prompt of ``steps`` time steps shows of a scan: ``timepoints`` (a step is one patch
        of the tokenizer; in the connectivity layout a window, each ``stride`` after the last)
        counted after resampling to ``target_tr`` (None: the native TR); ``None`` (the whole scan)
        when the scan token summarises all of it."""
        if self.scan_token:
            return None
        cfg = self.tokenizer_cfg
        if window_tokens(cfg):
            seen = cfg["data"]["window"] + (steps - 1) * token_hop(cfg)
        else:
            seen = steps * cfg["model"]["patch"]
        return {"timepoints": seen, "target_tr": cfg["data"]["target_tr"]}

    def part(self, scan_id: str, steps: int):
        if scan_id not in self.codes:
            raise ScanNotTokenized(f"scan {scan_id!r} has no tokens: re-run `fmrilm tokenize` over its dataset")
        c = self.codes[scan_id][:, :steps]
        f = self.feats[scan_id][:, :steps] if self.features else None
        v = self.vocab
        vec = self.vectors.get(scan_id)
        if vec is not None and len(vec) != self.scan_dim:
            raise UserError(f"scan {scan_id!r} has {c.shape[0]} ROIs, but the export's scan token was trained on scans of another "
                                f"ROI count ({self.scan_dim} ROI pairs): evaluate datasets of the atlas it was trained on")
        from fmrilm.data.lm_sequences import fmri_part

        return fmri_part(c, v["first_code_id"], v["open_id"], v["close_id"], f, vec)

    def shuffled(self, axis: Shuffle, seed: int = 0) -> ScanBlocks:
        """These blocks with every scan's codes (and encoder features) shuffled at test time
        (:func:`shuffle_order`); the scan vectors are kept. ``rois`` needs one code per ROI (the
        tokenizer's ``roi`` layout)."""
        import copy

        if axis == "rois" and self.tokenizer_cfg["model"].get("layout", "roi") != "roi":
            raise UserError("codes shuffled over ROIs need one code per ROI, but the tokenizer has one whole-brain code per step "
                            f"(model.layout={self.tokenizer_cfg['model']['layout']}): shuffle over time only")
        rng = np.random.default_rng(seed)
        out = copy.copy(self)
        out.codes, out.feats = {}, {}
        for scan_id in sorted(self.codes):
            order = shuffle_order(self.codes[scan_id].shape, axis, rng)
            out.codes[scan_id] = shuffle_codes(self.codes[scan_id], order)
            if scan_id in self.feats:
                out.feats[scan_id] = shuffle_codes(self.feats[scan_id], order)
        return out


Shuffle = Literal["time", "rois"]


def shuffle_order(shape: tuple[int, ...], axis: Shuffle, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays ``(channel, step)``, each ``[channels, steps]``, that shuffle a scan's codes of
    ``shape`` ``[channels, steps, ...]``: ``time`` permutes each channel's steps on its own (each
    ROI keeps its codes, their co-occurrence across ROIs at a time step is broken); ``rois``
    permutes the channels at each step on its own (each time step keeps its bag of codes, which
    ROI had which code is broken)."""
    channels, steps = shape[:2]
    ch, st = np.indices((channels, steps))
    if axis == "time":
        return ch, rng.permuted(st, axis=1)
    if axis == "rois":
        return rng.permuted(ch, axis=0), st
    raise ValueError(f"unknown shuffle {axis!r}: time or rois")


def shuffle_codes(x: np.ndarray, order: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``x`` ``[channels, steps, ...]`` (codes, or encoder features) reordered by :func:`shuffle_order`."""
    return x[order[0], order[1]]
