"""What a tiny LM makes of a bag of codes: does the LM read as much as a linear model of its tokens?

The science cohort (as ``token_designs.py``: z-scored scans, 480 training / 160 test subjects;
``--cohort dynamics``: 300 / 100, the diagnosis question) coded by a k-means codebook fitted on
the training subjects (``--codes`` codes). The built-in decoder is fed only each scan's codes (no
scan vector, no features) and asked the sex (diagnosis) question; its calibrated answers on the
test subjects are scored beside logistic readers of the code histogram and of the FC rebuilt
from the codes. Choices: how the LM's code rows start (``--rows projection``: today's
random projection of the codebook; ``pca``: the leading principal axes of the training scans'
code histograms; ``centroid``: no free rows, each code's row is a learned linear map of its
centroid, the pattern it stands for), ``--tokens`` (``state``: a code per TR for the brain's
pattern; ``connectivity``: a code per sliding window of 30 TRs, every 2, for the window's FC),
``--frozen`` (the rows never train), ``--permute`` (the code order shuffled in every training
example: a bag of tokens by construction), ``--pool`` (the mean of the scan's code rows, through
an MLP, added where the answer is predicted: a bag-of-tokens path inside the LM, built from its own
code rows) and ``--levels`` (residual codes: level l codes
what the levels before it left of each frame, a code of each level per TR, fed level after level
within a TR like the ROIs of a time step). Usage::

    python jobs/experiments/lm_reads_codes.py [--tokens state|connectivity] [--rows projection|pca|centroid] [--frozen] [--permute] [--pool] [--levels 1] [--steps 400]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

QUESTIONS = {"science": ("What is the sex of this participant?", {"M": "Male", "F": "Female"}),
             "dynamics": ("What is this participant's diagnosis?", {"Case": "Case", "Control": "Control"})}


def pca_rows(codes: np.ndarray, train, k: int, text: torch.Tensor) -> torch.Tensor:
    """``[k, hidden]`` code rows: the leading principal axes of the training scans' standardised
    code histograms, at the text rows' per-dimension mean and spread."""
    from token_designs import histogram

    h = histogram(codes[train], k)
    h = (h - h.mean(0)) / (h.std(0) + 1e-6)
    _, _, vt = np.linalg.svd(h, full_matrices=False)
    z = torch.from_numpy(vt[: text.shape[1]].T.copy()).float()
    z = (z - z.mean(0)) / z.std(0).clamp_min(1e-8)
    return text.mean(0) + text.std(0) * z


def residual_codes(vectors: np.ndarray, train, k: int, levels: int):
    """``vectors [subjects, tokens, dim]`` -> ``(codes [subjects, levels, tokens] with level l's ids
    offset by l * k, centroids [levels * k, dim], rebuilt vectors)``: k-means on the training
    vectors, then on what each level leaves."""
    from token_designs import kmeans_codes

    rest, codes, cents = vectors.copy(), [], []
    for level in range(levels):
        c, cent = kmeans_codes(rest, train, k, seed=level)
        rest = rest - cent[c]
        codes.append(c + level * k)
        cents.append(cent)
    return np.stack(codes, 1), np.concatenate(cents).astype(np.float32), vectors - rest


class CentroidRows(torch.nn.Module):
    """A causal LM whose code ids (``codes``) are embedded as ``Linear(centroid)``: the row of a
    code is a learned linear map of the pattern it stands for (``centroids [codes, dim]``: an ROI
    pattern, or a window's FC)."""

    def __init__(self, lm, codes: range, centroids: torch.Tensor):
        super().__init__()
        table = lm.get_input_embeddings().weight
        self.lm, self.codes = lm, codes
        self.register_buffer("centroids", centroids)
        self.proj = torch.nn.Linear(centroids.shape[1], table.shape[1])
        with torch.no_grad():  # rows start at the text rows' scale
            self.proj.weight.mul_(table.std().item() / (self.proj(centroids) - self.proj.bias).std().item())

    def embed(self, input_ids):
        is_code = (input_ids >= self.codes.start) & (input_ids < self.codes.stop)
        rows = self.proj(self.centroids[(input_ids - self.codes.start).clamp(0, len(self.codes) - 1)])
        return torch.where(is_code[..., None], rows, self.lm.get_input_embeddings()(input_ids))

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0, **_):
        return self.lm(inputs_embeds=self.embed(input_ids), attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=use_cache, logits_to_keep=logits_to_keep)


class PooledCodes(torch.nn.Module):
    """A causal LM plus the mean of each row's code embeddings (ids in ``codes``), projected by an
    MLP and added at ``scan_pos`` (where the answer is predicted). One example per packed row."""

    def __init__(self, lm, codes: range):
        super().__init__()
        hidden = lm.get_input_embeddings().weight.shape[1]
        self.lm, self.codes = lm, codes
        self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
        torch.nn.init.zeros_(self.mlp[2].weight)  # starts as the plain LM
        torch.nn.init.zeros_(self.mlp[2].bias)

    def forward(self, input_ids, attention_mask=None, position_ids=None, scan=None, scan_pos=None, use_cache=False, logits_to_keep=0):
        emb = self.lm.get_input_embeddings()(input_ids)
        is_code = ((input_ids >= self.codes.start) & (input_ids < self.codes.stop)).to(emb.dtype)[..., None]
        pooled = (emb * is_code).sum(1) / is_code.sum(1).clamp_min(1)  # [batch, hidden]
        vec = self.mlp(pooled)[:, None] * (scan_pos >= 0)[..., None].to(emb.dtype)
        emb = emb.scatter_add(1, scan_pos.clamp_min(0)[..., None].expand(-1, -1, emb.shape[-1]), vec)
        return self.lm(inputs_embeds=emb, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache,
                       logits_to_keep=logits_to_keep)


def main() -> None:
    from sklearn.metrics import balanced_accuracy_score
    from token_designs import cohort, histogram, score, window_fc

    from fmrilm.features import dynamics

    from fmrilm.data.instructions import encode, question_prompt
    from fmrilm.data.lm_sequences import fmri_part, pack
    from fmrilm.eval.scoring import calibrated_choices, score_choices
    from fmrilm.models.fmri_lm import add_fmri_vocab, forward_loss, init_code_embeddings, load_backbone

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--codes", type=int, default=256)
    ap.add_argument("--rows", choices=["projection", "pca", "centroid"], default="projection")
    ap.add_argument("--levels", type=int, default=1, help="residual code levels per token")
    ap.add_argument("--tokens", choices=["state", "connectivity"], default="state")
    ap.add_argument("--cohort", choices=["science", "dynamics"], default="science", help="science: sex; dynamics: diagnosis")
    ap.add_argument("--frozen", action="store_true")
    ap.add_argument("--permute", action="store_true")
    ap.add_argument("--pool", action="store_true")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    start = time.time()
    x, y, _, train, test = cohort(args.cohort)
    question, word = QUESTIONS[args.cohort]
    choices = [" " + w for w in word.values()]
    vectors = x.transpose(0, 2, 1) if args.tokens == "state" else window_fc(x, 30, 2)  # [subjects, tokens, dim]
    codes, centroids, rebuilt = residual_codes(vectors, train, args.codes, args.levels)  # [subjects, levels, tokens]
    size = args.codes * args.levels
    reader = score(histogram(codes, size), y, train, test)
    rebuilt_fc = score([dynamics.fc(f.T) for f in rebuilt] if args.tokens == "state" else rebuilt.mean(1), y, train, test)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    lm, tok, _ = load_backbone("tiny-gpt2", seed=args.seed)
    vocab = add_fmri_vocab(lm, tok, size)
    init_code_embeddings(lm, vocab, torch.from_numpy(centroids))
    table = lm.get_input_embeddings().weight
    rows = slice(vocab.first_code_id, vocab.first_code_id + size)
    if args.rows == "pca":
        with torch.no_grad():
            table[rows] = pca_rows(codes, train, size, table[: vocab.base_vocab].detach())
    if args.frozen:
        keep = torch.ones(table.shape[0], 1)
        keep[rows] = 0
        table.register_hook(lambda g: g * keep)
    if args.rows == "centroid":
        if args.pool:
            raise SystemExit("--rows centroid has no free code rows to pool: leave --pool out")
        model = CentroidRows(lm, range(rows.start, rows.stop), torch.from_numpy(centroids))
    else:
        model = PooledCodes(lm, range(rows.start, rows.stop)) if args.pool else lm
    where = np.zeros(1, np.float32) if args.pool else None  # a placeholder vector: marks where the answer is predicted

    def example(i, order=None, with_answer=True):
        c = codes[i] if order is None else codes[i][:, order]
        part = lambda _: fmri_part(c, vocab.first_code_id, vocab.open_id, vocab.close_id, scan=where)  # noqa: E731
        return encode(question_prompt("s", question), " " + word[y[i]] if with_answer else "", part, tok, with_answer=with_answer)

    length = len(example(train[0]).ids) + 4
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.1)
    model.train()
    for _ in range(args.steps):
        batch = [example(i, rng.permutation(codes.shape[2]) if args.permute else None) for i in rng.choice(train, 32, replace=False)]
        loss, _ = forward_loss(model, {k: torch.from_numpy(v) for k, v in pack(batch, length, tok.pad_token_id).items()}, {0: 1.0})
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    def scores(group):
        return score_choices(model, [example(i, with_answer=False) for i in group], choices, tok, length)

    label = {w: k for k, w in word.items()}
    pred = np.array([label[choices[i].strip()] for i in calibrated_choices(scores(test), scores(train[:64]))])
    print(json.dumps({"cohort": args.cohort, "tokens": args.tokens, "rows": args.rows, "levels": args.levels, "frozen": args.frozen, "permute": args.permute, "pool": args.pool,
                      "steps": args.steps, "lm_balanced_accuracy": round(float(balanced_accuracy_score(y[test], pred)), 3),
                      "histogram_logistic": round(reader, 3), "rebuilt_fc_logistic": round(rebuilt_fc, 3), "final_loss": round(loss.item(), 3), "seconds": round(time.time() - start)}))


if __name__ == "__main__":
    main()
