"""``fmrilm tune SPEC``: Ray Tune sweeps over any key of a stage spec (codebook size, LR, ...).

The Ray Train V2 pattern: each trial is a Tune *function* that builds the stage's spec from the
base spec plus the trial's values (dotted keys), names its run ``<sweep>-<trial id>`` under the
sweep's folder, and calls the stage's ``run``; that builds a ``TorchTrainer`` whose
``RunConfig`` carries ``TuneReportCallback`` (added by :func:`fmrilm.train.trainer.run_config`
inside a Tune session), so every Ray Train report reaches the scheduler. ASHA (default) stops
weak trials early; a stopped trial's actors, including its Train controller and workers, die
with it and free their CPUs. ``max_concurrent_trials`` is derived from the cluster's CPUs and a
trial's needs (its workers + a small driver share, one CPU kept for Ray Data), so a small machine
never waits on placement groups it cannot get.

Re-running the same spec restores the sweep (``Tuner.restore``): finished trials are kept,
unfinished and errored ones continue from their stage checkpoints (same run names). Results:
``results.parquet`` and ``results.md`` (every trial, its values, the metric, whether ASHA stopped
it), ``sweep.png`` (metric vs each swept key; learning curves) and ``best.yaml``, a ready spec of
the best trial (among those above the codebook-usage floor for tokenizer sweeps).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, ClassVar, Literal, NamedTuple

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from fmrilm.errors import UserError
from fmrilm import config as cfg
from fmrilm import runtime, storage
from fmrilm.config import RunLocation, StageSpec, Strict
from fmrilm.registry import JOBS, SWEEPABLE

log = logging.getLogger("fmrilm.tune")


class Dimension(Strict):
    """One swept key: exactly one of ``grid`` (every value), ``choice`` (sampled), ``loguniform``
    / ``uniform`` (``[low, high]``) or ``randint`` (``[low, high)``)."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("grid", "choice", "loguniform", "uniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, loguniform, uniform, randint (got {given or 'none'})")
        values = getattr(self, given[0])
        if given[0] in ("grid", "choice") and not values:
            raise ValueError(f"an empty {given[0]}: list at least one value")
        if given[0] in ("loguniform", "uniform", "randint") and not values[0] < values[1]:
            raise ValueError(f"{given[0]} needs low < high, got {list(values)}")
        if given[0] == "loguniform" and values[0] <= 0:
            raise ValueError("loguniform needs low > 0")
        return self

    def sample_value(self):
        """A value of this dimension, for checking the spec before any trial runs."""
        for k in ("grid", "choice"):
            if getattr(self, k) is not None:
                return getattr(self, k)[0]
        lo, _ = self.loguniform or self.uniform or self.randint
        return lo

    def to_tune(self):
        from ray import tune

        if self.grid is not None:
            return tune.grid_search(list(self.grid))
        if self.choice is not None:
            return tune.choice(list(self.choice))
        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        return tune.randint(*self.randint)


class SweepSpec(StageSpec):
    """Spec of ``jobs/sweep_*.yaml``."""

    moved_keys: ClassVar[dict[str, str]] = {"storage": "run.storage", "name": "run.name"}

    kind: Literal["sweep"] = "sweep"
    stage: str = Field("tokenizer", description="which stage's spec the trials run: tokenizer or instruct")
    base: str = Field(None, description="the stage spec every trial starts from (default jobs/<stage>.yaml)")
    overrides: list[str] = Field([], description="key=value applied to the base before the trial's values")
    space: dict[str, Dimension] = Field(..., description="dotted key of the stage spec -> its values")
    metric: str = Field(None, description="tokenizer: val/r2 (default), val/mse, ...; instruct: val/loss (default) or val/loss/<task>")
    mode: Literal["min", "max"] = Field(None, description="default: max for R^2/accuracy-like metrics, min for losses and errors")
    usage_floor: float | None = Field(0.05, ge=0, le=1, description="tokenizer: best trial needs val/used_fraction >= this")
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="ASHA: reports before a trial can be stopped")
    reduction_factor: int = Field(2, ge=2)
    search: Literal["random", "optuna"] = Field("random", description="random/grid, or Optuna's TPE (needs optuna installed)")
    num_samples: int = Field(1, ge=1, description="trials (random/optuna), or repeats of the grid")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: what the cluster's CPUs hold")
    run: RunLocation = RunLocation(name="sweep")

    @model_validator(mode="before")
    @classmethod
    def _stage_defaults(cls, data):
        """base, metric and mode follow the stage unless given."""
        if not isinstance(data, dict) or data.get("stage", "tokenizer") not in SWEEPABLE:
            return data
        stage = data.get("stage", "tokenizer")
        data = dict(data)
        data["base"] = data.get("base") or f"jobs/{stage}.yaml"
        data["metric"] = data.get("metric") or SWEEPABLE[stage]
        if data.get("mode") is None:
            lower_is_better = any(w in str(data["metric"]) for w in ("loss", "mse", "mae", "error"))
            data["mode"] = "min" if lower_is_better else "max"
        return data

    @model_validator(mode="after")
    def _stage(self):
        if self.stage not in SWEEPABLE:
            raise ValueError(f"stage {self.stage!r} cannot be swept; sweepable: {sorted(SWEEPABLE)}")
        if not self.space:
            raise ValueError("space is empty: name at least one key to sweep")
        return self


class SweepFailed(UserError, RuntimeError):
    """No trial of the sweep finished."""


class Stage(NamedTuple):
    """A sweepable stage: its spec model, ``run(spec)`` and ``check(spec)`` (pre-flight)."""

    model: type
    run: Callable
    check: Callable


def stage_of(name: str) -> Stage:
    """The :class:`Stage` of a sweepable stage name (a key of :data:`fmrilm.registry.SWEEPABLE`)."""
    job = JOBS[name]
    model, run_stage = job.load()
    return Stage(model, run_stage, job.check())


def sweep_dir(spec: SweepSpec) -> str:
    return storage.join(spec.run.storage, spec.run.name)


def base_stage(spec: SweepSpec) -> dict:
    """The base stage spec with the sweep's overrides, validated, local paths made absolute (trials
    run in their own folders), as a dict the trials add their values to."""
    from fmrilm.train.specs import worker_spec

    model = stage_of(spec.stage).model
    data = cfg.apply_overrides(cfg.load_yaml(spec.base), spec.overrides)
    data = worker_spec(cfg.build(model, data, spec.base))
    data["run"] |= {"storage": storage.join(storage.absolute(sweep_dir(spec)), "trials"), "logger": "none"}
    if spec.stage == "instruct" and spec.metric.startswith("val/") and not data.get("validation"):
        raise cfg.ConfigError(f"an instruct sweep on {spec.metric} needs validation subjects: add validation=0.2 (a fraction "
                              "of the training subjects) to the sweep's overrides")
    if spec.metric.startswith("val/"):
        data["train"]["log_every"] = data["train"]["checkpoint_every"]  # validate at every report: ASHA reads it
    return data


def trial_spec(spec: SweepSpec, values: dict[str, Any], run_name: str, base: dict | None = None):
    """The stage spec of one trial: the base stage (:func:`base_stage`) + the trial's values."""
    model = stage_of(spec.stage).model
    data = cfg.apply_overrides(base or base_stage(spec), [f"{k}={_yaml_value(v)}" for k, v in values.items()])
    data["run"]["name"] = run_name
    return cfg.build(model, data, f"{spec.base} (trial {run_name})")


def _yaml_value(v) -> str:
    import json

    return json.dumps(v.item() if isinstance(v, np.generic) else v)


def check(spec: SweepSpec) -> dict:
    """Fail before any trial: every swept key must be a key of the stage spec and every value
    of a grid/choice must validate. Returns :func:`base_stage`."""
    base = base_stage(spec)
    for key, dim in spec.space.items():
        for value in (dim.grid or dim.choice or [dim.sample_value()]):
            try:
                trial_spec(spec, {key: value}, "check", base)
            except cfg.ConfigError as err:
                raise cfg.ConfigError(f"sweep space key {key!r} (value {value!r}): {err}") from None
    return base


def check_inputs(spec: SweepSpec, base: dict) -> None:
    """The stage's own pre-flight on a sample trial (its data or model export exists), so missing
    inputs fail once, before any trial starts."""
    sample = trial_spec(spec, {k: d.sample_value() for k, d in spec.space.items()}, "check", base)
    stage_of(spec.stage).check(sample)
    if spec.stage == "tokenizer" and spec.metric.startswith("val/"):
        from fmrilm.data.pipeline import scan_index

        index = scan_index(sample.data)
        if not index.loc[index["split"] == "val", "n_windows"].sum():
            raise cfg.ConfigError(f"a tokenizer sweep on {spec.metric} needs validation windows, and the split of "
                                  f"{sample.data.root} gives none (no 'val' scan at least data.window={sample.data.window} long): "
                                  "ingest more subjects or sweep on a training metric (metric=loss, mode=min)")


def concurrency(spec: SweepSpec, cluster_cpus: float, base: dict) -> tuple[int, float]:
    """``(max concurrent trials, CPUs one trial needs)``: its workers plus a small driver share,
    with one CPU kept free for Ray Data's read tasks."""
    stage = trial_spec(spec, {}, "check", base)
    per_trial = stage.scaling.num_workers * stage.scaling.cpus_per_worker + TRIAL_DRIVER_CPU
    fits = max(1, math.floor((cluster_cpus - 1) / per_trial + 1e-9))
    return (min(fits, spec.max_concurrent_trials) if spec.max_concurrent_trials else fits), per_trial


TRIAL_DRIVER_CPU = 0.05  # Tune rejects {"CPU": 0}; the trial function only waits on its TorchTrainer


FORWARDED = ("FMRILM_FAULT_STEP",)  # the sweep driver's fault injection reaches its trials' drivers


def _trial(config: dict, sweep: dict, base: dict, env: dict[str, str]) -> None:
    """Tune function: run the stage for one trial (reports reach Tune via TuneReportCallback)."""
    from ray import tune

    for key in FORWARDED:
        if key in env:
            os.environ[key] = env[key]
        else:
            os.environ.pop(key, None)
    spec = SweepSpec(**sweep)
    name = f"{spec.run.name}-{tune.get_context().get_trial_id()}"
    stage_of(spec.stage).run(trial_spec(spec, config, name, base))


def run(spec: SweepSpec) -> dict:
    """Run (or resume) the sweep; write the results table, plots and best spec; return a summary."""
    import ray
    from ray import tune
    from ray.tune import TuneConfig, Tuner

    base = check(spec)
    check_inputs(spec, base)
    runtime.init_ray()
    limit, per_trial = concurrency(spec, ray.cluster_resources().get("CPU", 1), base)
    loc = storage.resolve(sweep_dir(spec))
    storage.makedirs(loc)
    trainable = tune.with_resources(tune.with_parameters(_trial, sweep=spec.model_dump(mode="json"), base=base,
                                                        env={k: os.environ[k] for k in FORWARDED if k in os.environ}), {"CPU": TRIAL_DRIVER_CPU})
    path = loc.join("tune")
    if Tuner.can_restore(path.path, storage_filesystem=loc.fs):
        log.info("resuming sweep %s from %s", spec.run.name, path.uri)
        tuner = Tuner.restore(path.path, trainable=trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=loc.fs)
    else:
        from ray.tune import RunConfig

        tuner = Tuner(trainable, param_space={k: d.to_tune() for k, d in spec.space.items()},
                      tune_config=TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=_scheduler(spec), search_alg=_search(spec),
                                             num_samples=spec.num_samples, max_concurrent_trials=limit),
                      run_config=RunConfig(name="tune", storage_path=loc.path, storage_filesystem=loc.fs))
    log.info("sweep %s: up to %d trial(s) at once, %.2f CPU each", spec.run.name, limit, per_trial)
    grid = tuner.fit()
    table = results_table(spec, grid)
    files = write_results(spec, table, grid)
    if len(table) and table["error"].notna().all():
        raise SweepFailed(f"every trial of sweep {spec.run.name} failed; the first: {table['error'].iloc[0]} "
                          f"(table: {files['results.md']}; re-running the spec retries them)")
    return {"trials": len(table), "stopped_early": int(table["stopped_early"].sum()), "errored": int(table["error"].notna().sum()),
            "max_concurrent_trials": limit, "files": files, "best": files.get("best.yaml"), "table": table}


def _scheduler(spec: SweepSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", grace_period=spec.grace_period, reduction_factor=spec.reduction_factor)


def _search(spec: SweepSpec):
    if spec.search == "random":
        return None
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise NotImplementedError(f"search: optuna needs the optuna package (pip install optuna): {err}") from None
    return OptunaSearch()


def results_table(spec: SweepSpec, grid) -> pd.DataFrame:
    """One row per trial: its values, final metric, codebook usage, iterations, early stop, error."""
    rows = []
    iters = [int((r.metrics or {}).get("training_iteration", 0)) for r in grid]
    top = max(iters) if iters else 0
    for r, n in zip(grid, iters):
        m = r.metrics or {}
        row = {"trial": m.get("trial_id") or os.path.basename(r.path), **{k: r.config.get(k) for k in spec.space},
               spec.metric: m.get(spec.metric), "iterations": n, "error": _error_line(r.error)}
        if spec.stage == "tokenizer":
            row["val/used_fraction"] = m.get("val/used_fraction")
        row["resumed_from_step"] = m.get("resumed_from_step")
        row["stopped_early"] = r.error is None and n < top
        rows.append(row)
    return pd.DataFrame(rows)


def _error_line(error) -> str | None:
    """The last meaningful line of a trial's error (the stage's own message), without colours."""
    if error is None:
        return None
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line and not line.startswith(("File ", "^", "~"))]
    return (lines[-1] if lines else type(error).__name__)[:200]


def best_row(spec: SweepSpec, table: pd.DataFrame) -> pd.Series | None:
    """The best finished trial (highest/lowest metric), above the usage floor for tokenizers."""
    ok = table[table["error"].isna() & table[spec.metric].notna()]
    if spec.stage == "tokenizer" and spec.usage_floor is not None and "val/used_fraction" in ok:
        kept = ok[ok["val/used_fraction"].fillna(0) >= spec.usage_floor]
        if kept.empty and not ok.empty:
            log.warning("no trial reached the codebook-usage floor %.2f: best chosen without it", spec.usage_floor)
        ok = kept if not kept.empty else ok
    if ok.empty:
        return None
    return ok.sort_values(spec.metric, ascending=spec.mode == "min").iloc[0]


def write_results(spec: SweepSpec, table: pd.DataFrame, grid) -> dict[str, str]:
    """``results.parquet``, ``results.md``, ``sweep.png`` and ``best.yaml`` under the sweep folder."""
    import yaml

    loc = storage.resolve(sweep_dir(spec))
    files = {}
    storage.write_parquet(loc.join("results.parquet"), table)
    storage.write_text(loc.join("results.md"), _markdown(spec, table))
    storage.write_bytes(loc.join("sweep.png"), _plot(spec, table, grid))
    files |= {n: loc.join(n).uri for n in ("results.parquet", "results.md", "sweep.png")}
    best = best_row(spec, table)
    if best is not None:
        stage = trial_spec(spec, {k: best[k] for k in spec.space}, f"{spec.run.name}-best")
        data = stage.model_dump(mode="json")
        data["run"] |= {"storage": storage.absolute(spec.run.storage)}
        text = f"# best trial {best['trial']} of sweep {spec.run.name}: {spec.metric} = {best[spec.metric]:.4f}\n" + yaml.safe_dump(data, sort_keys=False)
        storage.write_text(loc.join("best.yaml"), text)
        files["best.yaml"] = loc.join("best.yaml").uri
    return files


def _markdown(spec: SweepSpec, table: pd.DataFrame) -> str:
    lines = [f"# sweep {spec.run.name} ({spec.stage}): {spec.metric} ({spec.mode}), scheduler {spec.scheduler}", "", *_table_lines(table)]
    return "\n".join(lines) + "\n"


def _table_lines(table: pd.DataFrame) -> list[str]:
    """The results table as Markdown rows."""
    cols = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return lines + ["| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |"
                    for row in table.itertuples(index=False)]


def _short(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _plot(spec: SweepSpec, table: pd.DataFrame, grid) -> bytes:
    from fmrilm.plots import png_bytes, pyplot

    plt = pyplot()

    keys = list(spec.space)
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4.5 * (len(keys) + 1), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ok = table[table[spec.metric].notna()]
        x = pd.to_numeric(ok[key], errors="coerce")
        ax.scatter(x, ok[spec.metric], c=["C3" if s else "C0" for s in ok["stopped_early"]])
        if x.notna().all() and (x > 0).all() and x.max() / max(x.min(), 1e-12) >= 4:  # codebook sizes, LRs: log grids
            ax.set_xscale("log")
            values = sorted(set(x))
            if len(values) <= 8:
                ax.set_xticks(values, [_short(v) for v in values])
                ax.minorticks_off()
        ax.set_xlabel(key)
        ax.set_ylabel(spec.metric)
        ax.set_title("red: stopped early by ASHA", fontsize=8)
    curves = axes[0][-1]
    for r in grid:
        df = r.metrics_dataframe
        if df is not None and spec.metric in df:
            label = ", ".join(f"{k.rsplit('.', 1)[-1]}={_short(r.config.get(k))}" for k in keys)
            curves.plot(df["training_iteration"], df[spec.metric], marker="o", markersize=3, alpha=0.8, label=label)
    if curves.lines and len(curves.lines) <= 12:
        curves.legend(fontsize=6)
    curves.set_xlabel("report")
    curves.set_ylabel(spec.metric)
    curves.set_title("learning curves", fontsize=9)
    fig.tight_layout()
    return png_bytes(fig)


def summary(result: dict) -> list[str]:
    """Lines a person reads after :func:`run`; the first is the headline, then the results table."""
    return [f"{result['trials']} trials, {result['stopped_early']} stopped early, {result['errored']} errored "
            f"(up to {result['max_concurrent_trials']} at once); best spec: {result['best']}",
            *_table_lines(result["table"]), f"results: {result['files']['results.md']}"]
