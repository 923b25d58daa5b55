"""Which token design keeps what matters: codes of several layouts, probed beside FC readers.

Generates the science cohort (or the dynamics cohort) in memory, splits subjects 3:1, and for
each design learns a codebook on the training subjects' time points, codes every scan and fits
a logistic reader on the training subjects, scored on the test subjects (balanced accuracy):

* ``roi patch P``: one code per ROI and patch of P TRs (the tokenizer's ``roi`` layout);
* ``brain state``: one code per TR for the whole brain (the ``state`` layout);
* ``network``: one code per network and TR (a code per network's ROIs);
* ``connectivity state``: one code per sliding window (``--conn-window`` TRs, every
  ``--conn-stride``) for the window's whole FC (the dynamic-FC states of Allen et al. 2014): the
  codes name coupling patterns, so a bag of them is read linearly as FC;
* ``learned connectivity``: the tokenizer's ``connectivity`` layout itself (a code per window for
  its FC), trained here without Ray (``--conn-steps``; no alignment);
* ``fc-state tokenizer``: the same layout with ``model.encoder=fc`` (the window's correlations
  themselves, a centred quantizer: k-means on 16 x 256 windows, then EMA), ``--conn-steps`` steps;
* ``learned state``: the tokenizer's ``state`` layout itself, trained here without Ray
  (``--steps``; no alignment), coded with its nearest-code search.

Each design is read two ways: the histogram of a scan's codes (a bag of tokens: what a reader
that ignores order sees) and the FC of the signal rebuilt from the codes alone (codebook
centroids, or the learned decoder; for connectivity states the mean of the codes' FC centroids):
the coupling the codes keep. The offline codebooks are
k-means on the raw (z-scored) values. Usage::

    python jobs/experiments/token_designs.py [--cohort science|dynamics] [--steps 3000] [--only NAME] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def cohort(name: str):
    """``(x [subjects, rois, time] z-scored, labels, network per ROI, train ids, test ids)``."""
    from fmrilm.data import synth

    if name == "science":  # jobs/science.yaml's cohort
        p = synth.SynthParams(subjects=640, n_rois=42, n_networks=7, n_timepoints=200, tr=2.0, n_sites=2, sex_effect=0.3,
                              age_effect=0.2, site_effect=0.1, seed=1)
        label = "sex"
    else:  # the science job's dynamics cohort
        p = synth.SynthParams(subjects=400, dynamic_effects=["timescale", "lag", "dwell", "bursts"], seed=2)
        label = "diagnosis"
    x = np.stack([synth.simulate_scan(p, i) for i in range(p.subjects)])
    x = ((x - x.mean(2, keepdims=True)) / x.std(2, keepdims=True)).astype(np.float32)
    y = np.array([synth.subject(p, i)[label] for i in range(p.subjects)])
    nets = [synth.network_names(p)[k] for k in synth.roi_networks(p)]
    order = np.random.default_rng(0).permutation(p.subjects)
    cut = int(0.75 * p.subjects)
    return x, y, nets, order[:cut], order[cut:]


def score(features, y, train, test) -> float:
    """Balanced accuracy on ``test`` of a standardised logistic reader fitted on ``train``."""
    import warnings

    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    f = np.nan_to_num(np.asarray(features, np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=10, cv=5, max_iter=3000)).fit(f[train], y[train])
    return float(balanced_accuracy_score(y[test], model.predict(f[test])))


def kmeans_codes(vectors: np.ndarray, train, k: int, seed: int = 0):
    """``vectors [subjects, tokens, dim]`` -> ``(codes [subjects, tokens], centroids [k, dim])``."""
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(k, random_state=seed, batch_size=4096, n_init=3, max_iter=100).fit(vectors[train].reshape(-1, vectors.shape[-1]))
    return km.predict(vectors.reshape(-1, vectors.shape[-1])).reshape(vectors.shape[:2]), km.cluster_centers_


def histogram(codes: np.ndarray, k: int) -> np.ndarray:
    return np.stack([np.bincount(c.ravel(), minlength=k) / c.size for c in codes])


def window_fc(x: np.ndarray, width: int, stride: int) -> np.ndarray:
    """``x [subjects, rois, time]`` -> the FC upper triangle of each sliding window: ``[subjects, windows, pairs]``."""
    starts = range(0, x.shape[2] - width + 1, stride)
    w = np.stack([x[:, :, s : s + width] for s in starts], 1)  # [subjects, windows, rois, width]
    w = (w - w.mean(-1, keepdims=True)) / (w.std(-1, keepdims=True) + 1e-8)
    iu = np.triu_indices(x.shape[1], 1)
    return (np.einsum("nwrt,nwqt->nwrq", w, w) / width)[:, :, iu[0], iu[1]].astype(np.float32)


def fcs(signals: np.ndarray) -> np.ndarray:
    from fmrilm.features import dynamics

    return np.stack([dynamics.fc(s) for s in signals])


def designs(x, nets, train, steps: int, conn_window: int = 30, conn_stride: int = 2, conn_steps: int = 0, conn_domain: float = 0.0):
    """Yields ``(design, thunk)``; the thunk gives ``(tokens per scan, histogram features, FC
    rebuilt from the codes [subjects, pairs])``."""
    n, r, t = x.shape
    for patch, k in ((16, 128), (4, 128)):
        def roi(patch=patch, k=k):
            v = x[:, :, : t // patch * patch].reshape(n, r * (t // patch), patch)
            codes, cent = kmeans_codes(v, train, k)
            return v.shape[1], histogram(codes, k), fcs(cent[codes].reshape(n, r, -1))
        yield f"roi patch {patch} (k-means {k})", roi
    frames = x.transpose(0, 2, 1)
    for k in (256, 1024):
        def state(k=k):
            codes, cent = kmeans_codes(frames, train, k)
            return t, histogram(codes, k), fcs(cent[codes].transpose(0, 2, 1))
        yield f"brain state, 1 TR (k-means {k})", state
    for k in (64, 256):
        def conn(k=k):
            wfc = window_fc(x, conn_window, conn_stride)
            codes, cent = kmeans_codes(wfc, train, k)
            return wfc.shape[1], histogram(codes, k), cent[codes].mean(1)
        yield f"connectivity state, {conn_window} TRs every {conn_stride} (k-means {k})", conn
    groups = [np.flatnonzero(np.asarray(nets) == g) for g in dict.fromkeys(nets)]

    def network():
        rebuilt, hists = np.zeros_like(x), []
        for g in groups:
            codes, cent = kmeans_codes(frames[:, :, g], train, 16)
            rebuilt[:, g, :] = cent[codes].transpose(0, 2, 1)
            hists.append(histogram(codes, 16))
        return t * len(groups), np.hstack(hists), fcs(rebuilt)
    yield "network, 1 TR (k-means 16 per network)", network
    if steps:
        yield "learned state, 1 TR (256 codes)", lambda: learned_state(x, train, steps)
    if conn_steps:
        yield f"learned connectivity, {conn_window} TRs every {conn_stride} (256 codes)", lambda: learned_connectivity(
            x, train, conn_steps, conn_window, conn_stride, domain_weight=conn_domain)
        yield f"fc-state tokenizer, {conn_window} TRs every {conn_stride} (256 codes)", lambda: learned_connectivity(
            x, train, conn_steps, conn_window, conn_stride, encoder="fc")


def learned_connectivity(x, train, steps: int, window: int, stride: int, k: int = 256, domain_weight: float = 0.0,
                         encoder: str = "learned"):
    """The tokenizer's ``connectivity`` layout (patch = ``window``, ``encoder``) trained ``steps``
    steps of 64 training windows without Ray (with ``domain_weight``, the domain classifier
    against the built-in text corpus's MiniLM token embeddings, on the DANN schedule); every
    window of every scan coded (``stride`` apart); the rebuilt FC is the mean of the windows'
    rebuilt correlations. Prints the codes used."""
    import torch

    from fmrilm.models.alignment import AlignmentConfig, dann_coefficient
    from fmrilm.models.text import FALLBACK_CORPUS, embed_texts
    from fmrilm.models.tokenizer import TokenizerConfig
    from fmrilm.models.tokenizer_objective import TokenizerObjective

    torch.manual_seed(0)
    text = torch.from_numpy(np.asarray(embed_texts(FALLBACK_CORPUS, "minilm")[0], np.float32)) if domain_weight else None
    cfg = TokenizerConfig(layout="connectivity", encoder=encoder, rois=x.shape[1] if encoder == "fc" else 0, patch=window, num_codes=k)
    objective = TokenizerObjective(cfg, AlignmentConfig(domain_weight=domain_weight), text.shape[1] if domain_weight else 1)
    opt = torch.optim.AdamW(objective.parameters(), 1e-3)
    rng = np.random.default_rng(0)
    xt = torch.from_numpy(x)
    starts = np.arange(0, x.shape[2] - window + 1, stride)
    for step in range(steps):
        batch = torch.stack([xt[i, :, s : s + window] for i, s in zip(rng.choice(train, 64), rng.choice(starts, 64))])
        loss = objective(batch, torch.ones(64, dtype=torch.bool), dann_coefficient(step / steps), text)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    tok = objective.tokenizer.eval()
    iu = np.triu_indices(x.shape[1], 1)
    codes, rebuilt = [], []
    with torch.no_grad():
        for scan in xt:
            c = tok.tokenize(torch.stack([scan[:, s : s + window] for s in starts]))  # [windows, 1, 1]
            codes.append(c.reshape(-1).numpy())
            rebuilt.append(tok.decode(c, x.shape[1]).mean(0).numpy()[iu])
    print(f"  {encoder} connectivity (domain weight {domain_weight}): {len(np.unique(codes))} of {k} codes used", flush=True)
    return len(starts), histogram(np.stack(codes), k), np.stack(rebuilt)


def learned_state(x, train, steps: int, window: int = 32, k: int = 256):
    """The tokenizer's ``state`` layout (patch 1) trained ``steps`` steps on training windows."""
    import torch

    from fmrilm.models.alignment import AlignmentConfig
    from fmrilm.models.tokenizer import TokenizerConfig
    from fmrilm.models.tokenizer_objective import TokenizerObjective

    torch.manual_seed(0)
    objective = TokenizerObjective(TokenizerConfig(layout="state", patch=1, num_codes=k, dead_threshold=0.5), AlignmentConfig(domain_weight=0.0), 1)
    opt = torch.optim.AdamW(objective.parameters(), 1e-3)
    rng = np.random.default_rng(0)
    xt = torch.from_numpy(x)
    starts = np.arange(0, x.shape[2] - window + 1, window // 2)
    for _ in range(steps):
        batch = torch.stack([xt[i, :, s : s + window] for i, s in zip(rng.choice(train, 32), rng.choice(starts, 32))])
        loss = objective(batch, torch.ones(32, dtype=torch.bool))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    tok = objective.tokenizer.eval()
    nw = x.shape[2] // window
    codes, rebuilt = [], []
    for scan in xt:
        c = tok.tokenize(torch.stack([scan[:, j * window : (j + 1) * window] for j in range(nw)]))  # [windows, 1, window]
        codes.append(c.reshape(-1).numpy())
        rebuilt.append(tok.decode(c, x.shape[1]).permute(1, 0, 2).reshape(x.shape[1], -1).numpy())
    return nw * window, histogram(np.stack(codes), k), fcs(np.stack(rebuilt))


def main() -> None:
    from fmrilm.features import dynamics

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cohort", choices=["science", "dynamics"], default="science")
    ap.add_argument("--steps", type=int, default=3000, help="training steps of the learned state tokenizer (0: skip it)")
    ap.add_argument("--only", default="", help="run only the designs whose name starts with this")
    ap.add_argument("--conn-window", type=int, default=30)
    ap.add_argument("--conn-stride", type=int, default=2)
    ap.add_argument("--conn-steps", type=int, default=2000, help="training steps of the learned connectivity tokenizer (0: skip it)")
    ap.add_argument("--conn-domain-weight", type=float, default=0.0, help="its domain classifier's weight (0: no alignment)")
    ap.add_argument("--out", default="./fmrilm-data/experiments/token_designs")
    args = ap.parse_args()
    t0 = time.time()
    x, y, nets, train, test = cohort(args.cohort)
    rows = [("FC + logistic", x.shape[1] * (x.shape[1] - 1) // 2, score([dynamics.fc(s) for s in x], y, train, test), None),
            ("pre-whitened network FC", None, score([dynamics.prewhitened_fc(s, nets) for s in x], y, train, test), None)]
    if args.cohort == "dynamics":
        rows.append(("every classical reader combined", None, score([dynamics.combined(s, nets) for s in x], y, train, test), None))
    print(f"{args.cohort} cohort: {len(train)} training / {len(test)} test subjects, balanced accuracy\n\n"
          "| reader / design | tokens per scan | histogram (or reader) | FC of the signal rebuilt from codes |\n|---|---|---|---|")
    for n, t, h, d in rows:
        print(f"| {n} | | {h:.3f} | |", flush=True)
    for name, make in designs(x, nets, train, args.steps, args.conn_window, args.conn_stride, args.conn_steps, args.conn_domain_weight):
        if not name.startswith(args.only):
            continue
        tokens, hist, rebuilt_fc = make()
        rows.append((name, tokens, score(hist, y, train, test), score(rebuilt_fc, y, train, test)))
        print(f"| {name} | {tokens} | {rows[-1][2]:.3f} | {rows[-1][3]:.3f} |", flush=True)
    print(f"\n{time.time() - t0:.0f} s")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.cohort}{'-' + args.only.replace(' ', '_') if args.only else ''}.json"), "w") as f:
        json.dump([dict(zip(("design", "tokens", "histogram", "rebuilt_fc"), r)) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
