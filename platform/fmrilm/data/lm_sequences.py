"""Stage-2 training sequences: fMRI->fMRI, fMRI->text and text->text examples, packed.

Pure numpy; the LM stage maps these over Ray Data batches. An :class:`Example` carries, per
token: ``ids``, ``targets`` (the id this position must predict, ``IGNORE`` for none: the labels
are already shifted), ``groups`` (non-decreasing; a token may attend to every earlier-or-equal
group of its own example), ``positions`` and ``objective`` (which loss a target counts for).

* **fMRI->fMRI** (multi-channel autoregression, NeuroLM/fMRI-LM): ``<fmri>`` then the codes of
  time step 0 for every ROI, step 1 for every ROI, ... ``</fmri>``. The tokens of one step share a
  group (the ROIs of a step see each other and every earlier step); the token of ROI r at step w
  predicts the code of ROI r at step w + 1. Positions run over tokens as usual, so a position
  names a (step, ROI) pair: the model can tell the ROIs of a step apart.
* In the ``features`` input mode an example also carries, per fMRI token, the tokenizer
  encoder's feature vector (``feats [n, width]``) and its ROI index (``roi``, -1 elsewhere); the
  LM stage feeds them through a projector instead of the code embeddings (codes stay targets).
* With a scan vector (:mod:`fmrilm.models.scan_token`) an fMRI block also carries one summary
  of the whole scan (``scan [m, dim]``) and where it enters (``scan_at [m]``: the block's
  ``</fmri>`` token, so no token of the block sees it, or a later token that :func:`compose` is
  told of, e.g. where an instruction's answer is predicted); the LM stage projects it there.
* **fMRI->text**: the scan's fMRI block, then its caption; loss on the caption only.
* **text->text**: the caption alone, to keep the language model's language.

:func:`pack` fills fixed-length rows with whole examples (segment ids keep them apart);
:func:`attention_mask` turns segments + groups into the ``[batch, 1, L, L]`` boolean mask that
Hugging Face decoders take as ``attention_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = -100
OBJECTIVES = ("fmri_fmri", "fmri_text", "text_text")
SCAN_HERE = "scan_here"  # a compose part: the latest fMRI block's scan vector enters at the token before it
F2F, F2T, T2T = 0, 1, 2


@dataclass
class Example:
    ids: np.ndarray  # [n] int64
    targets: np.ndarray  # [n] int64, IGNORE where nothing is predicted
    groups: np.ndarray  # [n] int32, non-decreasing
    positions: np.ndarray  # [n] int64
    objective: np.ndarray  # [n] int8, -1 where there is no target
    feats: np.ndarray | None = None  # [n, width] float32 encoder features (features input mode)
    roi: np.ndarray | None = None  # [n] int32 ROI index of fMRI tokens, -1 elsewhere
    scan: np.ndarray | None = None  # [m, dim] float32 scan vectors of the example's fMRI blocks
    scan_at: np.ndarray | None = None  # [m] int64 position of each scan vector (its block's </fmri>, or where compose put it)

    def __len__(self) -> int:
        return len(self.ids)


def _fmri_block(codes: np.ndarray, first_code_id: int, open_id: int, close_id: int, predict_next: bool, feats: np.ndarray | None,
                scan: np.ndarray | None = None):
    """Token arrays of ``<fmri> steps </fmri>`` for ``codes [rois, steps]`` (code indices),
    optional encoder ``feats [rois, steps, width]`` and an optional scan vector ``scan [dim]``."""
    rois, steps = codes.shape
    step_ids = codes.T.astype(np.int64) + first_code_id  # [steps, rois], step-major
    ids = np.concatenate([[open_id], step_ids.ravel(), [close_id]])
    targets = np.full(len(ids), IGNORE, np.int64)
    if predict_next and steps > 1:
        targets[1 : 1 + rois * (steps - 1)] = step_ids[1:].ravel()
    groups = np.concatenate([[0], np.repeat(np.arange(1, steps + 1), rois), [steps + 1]]).astype(np.int32)
    extra = {}
    if feats is not None:
        width = feats.shape[-1]
        step_feats = feats.transpose(1, 0, 2).reshape(rois * steps, width)
        extra["feats"] = np.concatenate([np.zeros((1, width), np.float32), step_feats, np.zeros((1, width), np.float32)]).astype(np.float32)
        extra["roi"] = np.concatenate([[-1], np.tile(np.arange(rois), steps), [-1]]).astype(np.int32)
    if scan is not None:
        extra["scan"] = np.asarray(scan, np.float32)[None]
        extra["scan_at"] = np.array([len(ids) - 1], np.int64)
    return ids, targets, groups, extra


def fmri_to_fmri(codes: np.ndarray, first_code_id: int, open_id: int, close_id: int, feats: np.ndarray | None = None,
                 scan: np.ndarray | None = None) -> Example:
    """Next-step code prediction over ``codes [rois, steps]`` (see the module docstring)."""
    ids, targets, groups, extra = _fmri_block(codes, first_code_id, open_id, close_id, True, feats, scan)
    return Example(ids, targets, groups, np.arange(len(ids), dtype=np.int64), np.where(targets != IGNORE, F2F, -1).astype(np.int8), **extra)


def fmri_to_text(codes: np.ndarray, caption_ids: np.ndarray, first_code_id: int, open_id: int, close_id: int, eos_id: int,
                 feats: np.ndarray | None = None, scan: np.ndarray | None = None) -> Example:
    """Caption conditioned on the fMRI block; targets on the caption and its end only."""
    block = fmri_part(codes, first_code_id, open_id, close_id, feats, scan)
    return compose([block, ("answer", np.concatenate([np.asarray(caption_ids, np.int64), [eos_id]]))], F2T)


def fmri_part(codes: np.ndarray, first_code_id: int, open_id: int, close_id: int, feats: np.ndarray | None = None,
              scan: np.ndarray | None = None) -> tuple:
    """A :func:`compose` part: the ``<fmri> ... </fmri>`` block of ``codes [rois, steps]``
    (with its encoder ``feats`` and scan vector ``scan [dim]`` when given)."""
    return ("fmri", *_fmri_block(codes, first_code_id, open_id, close_id, False, feats, scan))


def compose(parts: list[tuple], objective: int) -> Example:
    """One example from parts in order: ``fmri_part(...)`` blocks, ``("text", ids)`` (context,
    no targets), ``("answer", ids)`` (every token a target, predicted by the token before it) and
    ``(SCAN_HERE,)`` (the latest block's scan vector is added at the token before it instead of
    at the block's ``</fmri>``).
    Text tokens get a group each (plain causal attention); fMRI blocks keep their step groups.
    Targets count for ``objective``."""
    ids, targets, groups, feats, roi, scan, scan_at = [], [], [], [], [], [], []
    width = next((p[4]["feats"].shape[1] for p in parts if p[0] == "fmri" and "feats" in p[4]), None)
    next_group, at, last_has_scan = 0, 0, False
    for part in parts:
        if part[0] == SCAN_HERE:
            if last_has_scan:  # the latest block's scan vector moves to the token before this point
                scan_at[-1] = np.array([at - 1], np.int64)
            continue
        if part[0] == "fmri":
            _, b_ids, b_targets, b_groups, extra = part
            last_has_scan = "scan" in extra
            b_groups = b_groups + next_group
            if "scan" in extra:
                scan.append(extra["scan"])
                scan_at.append(extra["scan_at"] + at)
            if width is not None:
                feats.append(extra["feats"])
                roi.append(extra["roi"])
        else:
            b_ids = np.asarray(part[1], np.int64)
            b_targets = np.full(len(b_ids), IGNORE, np.int64)
            b_groups = next_group + np.arange(len(b_ids), dtype=np.int32)
            if width is not None:
                feats.append(np.zeros((len(b_ids), width), np.float32))
                roi.append(np.full(len(b_ids), -1, np.int32))
            if part[0] == "answer" and len(b_ids):
                if not ids:
                    raise ValueError("an answer needs something before it to be predicted from")
                targets[-1] = np.concatenate([targets[-1][:-1], b_ids[:1]])  # the last context token predicts the first answer token
                b_targets = np.concatenate([b_ids[1:], [IGNORE]])
        ids.append(b_ids)
        targets.append(b_targets)
        groups.append(b_groups.astype(np.int32))
        next_group = int(groups[-1][-1]) + 1 if len(b_ids) else next_group
        at += len(b_ids)
    ids_a, targets_a = np.concatenate(ids), np.concatenate(targets)
    extra = {"feats": np.concatenate(feats), "roi": np.concatenate(roi)} if width is not None else {}
    if scan:
        extra |= {"scan": np.concatenate(scan), "scan_at": np.concatenate(scan_at)}
    return Example(ids_a, targets_a, np.concatenate(groups), np.arange(len(ids_a), dtype=np.int64),
                   np.where(targets_a != IGNORE, objective, -1).astype(np.int8), **extra)


def text_to_text(caption_ids: np.ndarray, bos_id: int, eos_id: int) -> Example:
    """Plain causal language modelling of ``bos caption eos``."""
    ids = np.concatenate([[bos_id], np.asarray(caption_ids, np.int64), [eos_id]])
    targets = np.concatenate([ids[1:], [IGNORE]]).astype(np.int64)
    n = len(ids)
    return Example(ids, targets, np.arange(n, dtype=np.int32), np.arange(n, dtype=np.int64),
                   np.where(targets != IGNORE, T2T, -1).astype(np.int8))


def steps_that_fit(rois: int, seq_len: int, extra: int = 0) -> int:
    """Time steps of a ``rois``-wide fMRI block that fit in ``seq_len`` with ``extra`` other tokens."""
    return max(0, (seq_len - 2 - extra) // max(1, rois))


def pack(examples: list[Example], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Greedy in-order packing of whole examples into rows of ``seq_len``.

    Returns ``ids, targets, groups, positions, objective`` and ``segments`` (1, 2, ... per example
    in a row; 0 for padding), each ``[rows, seq_len]``, plus ``feats [rows, seq_len, width]`` and
    ``roi [rows, seq_len]`` when examples carry encoder features, and ``scan [rows, M, dim]`` with
    ``scan_pos [rows, M]`` (-1: none; ``M`` the most scan vectors in a row) when they carry scan
    vectors. An example longer than ``seq_len`` is an error naming its length (build examples with
    :func:`steps_that_fit`).
    """
    rows: list[list[Example]] = []
    used = seq_len
    for ex in examples:
        if len(ex) > seq_len:
            raise ValueError(f"an example of {len(ex)} tokens does not fit seq_len={seq_len}")
        if used + len(ex) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += len(ex)
    n = len(rows)
    width = next((ex.feats.shape[1] for ex in examples if ex.feats is not None), None)
    out = {"ids": np.full((n, seq_len), pad_id, np.int64), "targets": np.full((n, seq_len), IGNORE, np.int64),
           "groups": np.zeros((n, seq_len), np.int32), "positions": np.zeros((n, seq_len), np.int64),
           "objective": np.full((n, seq_len), -1, np.int8), "segments": np.zeros((n, seq_len), np.int32)}
    if width is not None:
        out |= {"feats": np.zeros((n, seq_len, width), np.float32), "roi": np.full((n, seq_len), -1, np.int32)}
    dim = next((ex.scan.shape[1] for ex in examples if ex.scan is not None), None)
    if dim is not None:
        most = max(sum(len(ex.scan_at) for ex in row if ex.scan is not None) for row in rows)
        out |= {"scan": np.zeros((n, most, dim), np.float32), "scan_pos": np.full((n, most), -1, np.int64)}
    for r, row in enumerate(rows):
        at, m = 0, 0
        for s, ex in enumerate(row, start=1):
            sl = slice(at, at + len(ex))
            out["ids"][r, sl], out["targets"][r, sl] = ex.ids, ex.targets
            out["groups"][r, sl], out["positions"][r, sl] = ex.groups, ex.positions
            out["objective"][r, sl], out["segments"][r, sl] = ex.objective, s
            if width is not None and ex.feats is not None:
                out["feats"][r, sl], out["roi"][r, sl] = ex.feats, ex.roi
            if dim is not None and ex.scan is not None:
                k = len(ex.scan_at)
                out["scan"][r, m : m + k], out["scan_pos"][r, m : m + k] = ex.scan, ex.scan_at + at
                m += k
            at += len(ex)
    return out


def as_row(ex: Example, n: int | None = None) -> dict[str, np.ndarray]:
    """One example as a packed batch of one row over its first ``n`` tokens (default all):
    ``ids, groups, positions, segments [1, n]`` and the fMRI inputs it carries (``feats``,
    ``roi``; ``scan [1, m, dim]`` and ``scan_pos [1, m]``, whose positions must lie before ``n``)."""
    n = len(ex) if n is None else n
    row = {"ids": ex.ids[:n], "groups": ex.groups[:n], "positions": ex.positions[:n], "segments": np.ones(n, np.int32)}
    if ex.feats is not None:
        row |= {"feats": ex.feats[:n], "roi": ex.roi[:n]}
    if ex.scan is not None:
        row |= {"scan": ex.scan, "scan_pos": ex.scan_at}
    return {k: np.asarray(v)[None] for k, v in row.items()}


def attention_mask(segments, groups):
    """``[batch, 1, L, L]`` boolean mask: query i may attend key j iff both are in the same
    example and ``groups[j] <= groups[i]``; padding attends only to itself (no empty rows).
    Works on numpy arrays or torch tensors."""
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]
    allowed = (seg_q == seg_k) & (seg_k > 0) & (groups[:, None, :] <= groups[:, :, None])
    n = segments.shape[-1]
    if isinstance(segments, np.ndarray):
        allowed |= np.eye(n, dtype=bool)[None] & (segments == 0)[:, :, None]
    else:
        import torch

        allowed = allowed | (torch.eye(n, dtype=torch.bool, device=segments.device)[None] & (segments == 0)[:, :, None])
    return allowed[:, None]
