"""A tokenizer scored on held-out windows: reconstruction, code usage, FC preservation and the
domain classifier's accuracy. :func:`window_metrics` runs inside training (a rank's validation
shard) and here alike; :func:`evaluate` scores an artifact (``fmrilm tokenizer eval``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from fmrilm import runtime
from fmrilm.artifacts import tokenizer as artifact
from fmrilm.data.pipeline import PipelineSpec, build_windows, torch_batches
from fmrilm.errors import UserError
from fmrilm.models.tokenizer import r2_per_roi
from fmrilm.models.tokenizer_objective import TokenizerObjective
from fmrilm.ranks import sum_across_ranks


@torch.no_grad()
def window_metrics(objective: TokenizerObjective, shard, batch_size: int, text_tokens) -> dict[str, float]:
    """Held-out metrics over a (rank's) window shard, summed across ranks when a process group is
    up: R^2 (mean over windows x ROIs), MSE, code perplexity/usage, domain-classifier accuracy
    against ``text_tokens [n, text_dim]`` (when the objective has its head), and FC preservation
    (per scan, the Pearson r between the upper triangles of the input's FC over the scan's windows
    stitched together and of the decoded signal's, or in the connectivity layout of the mean of
    the decoded windows' correlations; mean over scans). R^2 and MSE are of what the tokenizer
    rebuilds (:meth:`~fmrilm.models.tokenizer.FMRITokenizer.target`). Keys start with ``val/``."""
    from fmrilm.features.connectivity import fc_agreement, fc_preservation, signal_fc, stitch

    objective.eval()
    tok = objective.tokenizer
    device = next(objective.parameters()).device
    sums = {"r2": 0.0, "mse": 0.0, "n": 0.0, "dom_correct": 0.0, "dom_n": 0.0, "fc_r": 0.0, "fc_n": 0.0}
    counts = torch.zeros(tok.cfg.num_codes, dtype=torch.float64, device=device)
    scans: dict[str, list] = {}  # scan -> [(start, input window, decoded window)] for whole-scan FC
    for batch in torch_batches(shard, batch_size):
        x, valid = batch["x"].to(device), batch["valid"].to(device)
        if not valid.any():
            continue
        keep = valid.cpu().numpy()
        x = x[valid]
        out = tok(x)
        target = tok.target(x)
        for sid, start, xi, ri in zip(np.asarray(batch["scan_id"])[keep], np.asarray(batch["start"])[keep], x.cpu().numpy(),
                                      out.recon.cpu().numpy()):
            scans.setdefault(str(sid), []).append((int(start), xi, ri))
        r2 = r2_per_roi(target, out.recon)
        sums["r2"] += float(r2.sum())
        sums["mse"] += float(((out.recon - target) ** 2).mean(-1).sum())
        sums["n"] += r2.numel()
        counts += torch.bincount(out.codes.flatten(), minlength=tok.cfg.num_codes).double()
        if objective.align is not None and text_tokens is not None:
            _, acc = objective.align.domain_loss(out.features, text_tokens, 0.0)
            k = min(objective.align_cfg.tokens_per_step, out.features.shape[0] * out.features.shape[1], text_tokens.shape[0])
            sums["dom_correct"] += float(acc) * 2 * k
            sums["dom_n"] += 2 * k
    for windows in scans.values():  # the windows this rank holds of each scan, stitched
        inputs = stitch([(s, xi) for s, xi, _ in windows])
        if tok.cfg.layout == "connectivity":
            sums["fc_r"] += fc_agreement(signal_fc(inputs), np.mean([ri for _, _, ri in windows], axis=0))
        else:
            sums["fc_r"] += fc_preservation(inputs, stitch([(s, ri) for s, _, ri in windows]))
        sums["fc_n"] += 1
    sums = sum_across_ranks(sums, device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    objective.train()
    p = counts / counts.sum().clamp_min(1)
    out = {"val/r2": sums["r2"] / max(sums["n"], 1), "val/mse": sums["mse"] / max(sums["n"], 1),
           "val/perplexity": float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())),
           "val/used_fraction": float((counts > 0).double().mean())}
    if sums["dom_n"]:
        out["val/domain_acc"] = sums["dom_correct"] / sums["dom_n"]
    if sums["fc_n"]:
        out["val/fc_preservation"] = sums["fc_r"] / sums["fc_n"]
    return out


def evaluate(uri: str, data: PipelineSpec, split: str | None = None, batch_size: int = 64) -> dict:
    """Held-out metrics (:func:`window_metrics`, without the ``val/`` prefix) of the tokenizer
    artifact at ``uri`` on the windows of ``split`` (None: every scan) of ``data``, windowed as
    the artifact was trained, plus ``windows``, ``split``, ``num_codes`` and ``input_warnings``.
    A held-out split holding a subject the artifact trained on is refused."""
    from fmrilm.data.pipeline import scan_index
    from fmrilm.data.splits import check_unseen, subject_keys
    from fmrilm.features.text_bank import text_inputs

    cfg = artifact.read_config(uri)
    data = artifact.windows_like(data, cfg)
    runtime.init_ray()
    warnings = artifact.check_inputs(data, cfg, uri)
    if split not in (None, "train"):
        check_unseen(subject_keys(scan_index(data), (split,)), cfg.get("split"), f"scored as held-out split {split!r}", uri)
    objective, _ = artifact.load_objective(uri)
    text_tokens = text_inputs(objective.align_cfg, data)[0] if objective.align is not None else None
    ds, n = build_windows(data, split)
    if n == 0:
        raise UserError(f"no windows to evaluate in split {split!r} of {data.root} (datasets {data.datasets or 'all'})")
    metrics = window_metrics(objective, ds, batch_size, torch.from_numpy(text_tokens) if text_tokens is not None else None)
    return {k.removeprefix("val/"): v for k, v in metrics.items()} | {"windows": n, "split": split, "num_codes": cfg["model"]["num_codes"],
                                                                      "input_warnings": warnings}
