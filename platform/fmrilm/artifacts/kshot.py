"""The k-shot adapter set: ``<storage>/<run>/``, written by the kshot stage.

``adapters/<task>-k<k>-seed<seed>/`` each hold an LM export (:mod:`fmrilm.artifacts.lm`,
``adapter`` layout over the pretrained export, or ``full``); ``kshot.json`` indexes them:
``base_model``, the split record ``split``, the labeller the answers were written with
(``age_cuts``, ``classes``) and ``adapters``: ``[{task, k, seed, model, scan_ids, train_rows}]``,
the scans each adapter was tuned on (evaluation fits FC + linear on the same ones).
"""

from __future__ import annotations

import json

from fmrilm import storage
from fmrilm.errors import UserError

INDEX = "kshot.json"


class KShotMissing(UserError, FileNotFoundError):
    """No k-shot adapter set where a spec points."""


def adapter_location(run: str, task: str, k: int, seed: int) -> str:
    """URI of the export of one adapter of the set at ``run`` (``<storage>/<name>``)."""
    return storage.join(run, "adapters", f"{task}-k{k}-seed{seed}")


def write_index(run: str, index: dict) -> str:
    """Write ``kshot.json`` of the set at ``run``; returns its URI."""
    loc = storage.resolve(run).join(INDEX)
    storage.write_text(loc, json.dumps(index, indent=1))
    return loc.uri


def read_index(run: str) -> dict:
    """``kshot.json`` of the set at ``run``, or a clear error if there is none."""
    loc = storage.resolve(run).join(INDEX)
    if not storage.exists(loc):
        raise KShotMissing(f"{run} holds no k-shot adapters (no {INDEX}): run `fmrilm run jobs/kshot.yaml` first, "
                           "or leave kshot_lora out of the evaluation's paradigms")
    return json.loads(storage.read_text(loc))
