"""Job kinds and job files: a spec's ``kind`` names the pydantic model that validates it and the
function ``run(spec) -> artifacts`` that executes it; a job file is such a spec plus an optional
``submit:`` section (used only by ``fmrilm submit``). The CLI and a Ray Jobs entrypoint both go
through here, so a spec runs the same way locally and on a cluster."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from pydantic import Field

from fmrilm.config import ConfigError, Strict


@dataclass(frozen=True)
class Job:
    """One job kind: the module holding its spec model (named ``spec``), ``run(spec)``,
    ``summary(result)`` (what the CLI prints) and, for the stages, ``check(spec)`` (the
    pre-flight); ``sweep_metric`` is the default metric when it is swept (None: it cannot be)."""

    kind: str
    module: str
    spec: str
    sweep_metric: str | None = None

    def load(self) -> tuple[type, Callable]:
        """``(spec model, run function)``, imported on first use."""
        mod = importlib.import_module(self.module)
        return getattr(mod, self.spec), mod.run

    def check(self) -> Callable:
        """The stage's ``check(spec)``: every failure that can happen before a worker starts."""
        return importlib.import_module(self.module).check

    def summary(self) -> Callable[[dict], list[str]]:
        """The kind's ``summary(result)``: the lines a person reads after a run, the headline first."""
        return importlib.import_module(self.module).summary


# The one table of job kinds: the CLI, `fmrilm run`, Ray Jobs entrypoints, sweeps and the
# quickstart all read it.
JOBS: dict[str, Job] = {j.kind: j for j in (
    Job("quickstart", "fmrilm.quickstart", "QuickstartSpec"),
    Job("science", "fmrilm.science", "ScienceSpec"),
    Job("features", "fmrilm.features.job", "FeaturesSpec"),
    Job("tokenizer", "fmrilm.train.tokenizer", "TokenizerStageSpec", sweep_metric="val/r2"),
    Job("tokenize", "fmrilm.tokens", "TokenizeSpec"),
    Job("pretrain", "fmrilm.train.lm", "PretrainSpec"),
    Job("instruct", "fmrilm.train.instruct", "InstructSpec", sweep_metric="val/loss"),
    Job("kshot", "fmrilm.train.kshot", "KShotSpec"),
    Job("eval", "fmrilm.eval.run", "EvalSpec"),
    Job("sweep", "fmrilm.tune.sweep", "SweepSpec"),
)}
# The quickstart chain, in order: ingestion, then the stage kinds above.
PIPELINE: tuple[str, ...] = ("ingest", "features", "tokenizer", "tokenize", "pretrain", "instruct", "kshot", "eval")
SWEEPABLE: dict[str, str] = {k: j.sweep_metric for k, j in JOBS.items() if j.sweep_metric}


class SubmitSpec(Strict):
    """The ``submit:`` section of a job spec (ignored by ``fmrilm run``)."""

    env: list[str] = Field(default_factory=list, description="names of environment variables passed to the job (never credentials)")
    entrypoint_num_cpus: float = Field(0.0, ge=0, description="CPUs reserved for the job's driver process")


class SubmitSection(Strict):
    """Validates ``submit:`` so that errors name the full key (``submit.env``)."""

    submit: SubmitSpec = Field(default_factory=SubmitSpec)


def job_for(kind: str | None, source: str = "<spec>"):
    """Return ``(spec model, run function)`` for a job kind."""
    if kind in JOBS:
        return JOBS[kind].load()
    raise ConfigError(f"{source}: kind: {kind!r} is not a job kind; use one of {sorted(JOBS)}")


def load_job(spec_uri: str, overrides: list[str], kind: str | None = None):
    """``(spec, run function, submit spec)`` of a job YAML with dotted overrides; ``kind`` is what
    a stage command expects (the YAML may leave it out, but may not name another). The optional
    ``submit:`` section is validated here and used only by ``fmrilm submit``."""
    from fmrilm import config

    data = config.apply_overrides(config.load_yaml(spec_uri), overrides)
    if kind is not None:
        if data.setdefault("kind", kind) != kind:
            raise ConfigError(f"{spec_uri}: kind {data['kind']!r}, but this command runs {kind!r} specs (use `fmrilm run`)")
    submit = config.build(SubmitSection, {"submit": data.pop("submit", None) or {}}, spec_uri).submit
    model, fn = job_for(data.get("kind"), spec_uri)
    return config.build(model, data, spec_uri), fn, submit
