"""Job kinds and job files: a spec's ``kind`` names the pydantic model that validates it and the
function ``run(spec) -> artifacts`` that executes it; a job file is such a spec plus an optional
``submit:`` section (used only by ``fmrilm submit``). The CLI and a Ray Jobs entrypoint both go
through here, so a spec runs the same way locally and on a cluster."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Mapping

from pydantic import Field

from fmrilm.config import ConfigError, Strict


@dataclass(frozen=True)
class Job:
    """One job kind: the module holding its spec model (named ``spec``), ``run(spec)``,
    ``summary(result)`` (what the CLI prints) and, for the stages, ``check(spec)`` (the
    pre-flight); ``sweep_metric`` is the default metric when it is swept (None: it cannot be).

    How a stage sits in a chain (the quickstart, the science job): ``inputs`` maps a spec key to
    the stage whose output it reads; a stage that writes a run (``run: {storage, name}``) puts
    its ``output`` under ``<runs>/<name>/`` (``""``: the run folder itself); ``per_variant``
    stages are run once per LM variant of a chain (their run names carry its tag), the others
    are shared by every variant."""

    kind: str
    module: str
    spec: str
    sweep_metric: str | None = None
    inputs: dict[str, str] = field(default_factory=dict)
    writes_run: bool = True
    output: str = ""
    per_variant: bool = False

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
    Job("quickstart", "fmrilm.quickstart", "QuickstartSpec", writes_run=False),
    Job("science", "fmrilm.science", "ScienceSpec", writes_run=False),
    Job("features", "fmrilm.features.job", "FeaturesSpec", writes_run=False),  # writes into each dataset folder
    Job("tokenizer", "fmrilm.train.tokenizer", "TokenizerStageSpec", sweep_metric="val/r2", output="tokenizer"),
    Job("tokenize", "fmrilm.tokens", "TokenizeSpec", inputs={"tokenizer": "tokenizer"}, writes_run=False),  # beside the tokenizer
    Job("pretrain", "fmrilm.train.lm", "PretrainSpec", inputs={"tokenizer": "tokenizer"}, output="model", per_variant=True),
    Job("instruct", "fmrilm.train.instruct", "InstructSpec", sweep_metric="val/loss", inputs={"model": "pretrain"}, output="model",
        per_variant=True),
    Job("kshot", "fmrilm.train.kshot", "KShotSpec", inputs={"model": "pretrain"}, per_variant=True),
    Job("vlm", "fmrilm.train.vlm", "VLMSpec", output="model"),  # the poster's baseline: a VLM shown scans as images
    Job("eval", "fmrilm.eval.run", "EvalSpec", inputs={"model": "instruct", "kshot": "kshot"}, per_variant=True),
    Job("sweep", "fmrilm.tune.sweep", "SweepSpec"),
)}
# The quickstart chain, in order: ingestion, then the stage kinds above.
PIPELINE: tuple[str, ...] = ("ingest", "features", "tokenizer", "tokenize", "pretrain", "instruct", "kshot", "eval")
SWEEPABLE: dict[str, str] = {k: j.sweep_metric for k, j in JOBS.items() if j.sweep_metric}


def run_name(stage: str, tag: str = "", own: Mapping[str, str] | None = None) -> str:
    """A stage's run name in a chain: the stage, plus the variant's ``tag`` for per-variant stages,
    or the suffix ``own`` gives a shared stage the variant runs its own way (:func:`own_stages`)."""
    return stage + (tag if JOBS[stage].per_variant else (own or {}).get(stage, ""))


def own_stages(changed: set[str]) -> frozenset[str]:
    """The shared stages a variant must run under its own tag when it changes the settings of
    ``changed``: those of them that are shared, and every stage reading one of them (tokenize
    reads the tokenizer), so that no variant's output overwrites another's."""
    own: set[str] = set()
    for s in PIPELINE:  # in pipeline order: a stage's inputs come before it
        if s in JOBS and not JOBS[s].per_variant and (s in changed or set(JOBS[s].inputs.values()) & own):
            own.add(s)
    return frozenset(own)


def chain_paths(stage: str, root: str, tag: str = "", own: Mapping[str, str] | None = None) -> list[str]:
    """The overrides that put a stage's data, inputs and run under a chain's storage ``root``
    (``<root>/datasets``, ``<root>/runs``): each input is the output of the stage named for it
    (named by :func:`run_name`)."""
    from fmrilm import storage

    runs = storage.join(root, "runs")
    job = JOBS[stage]
    paths = [f"data.root={storage.join(root, 'datasets')}"]
    for key, producer in job.inputs.items():
        output = [JOBS[producer].output] if JOBS[producer].output else []
        paths.append(f"{key}={storage.join(runs, run_name(producer, tag, own), *output)}")
    if job.writes_run:
        paths += [f"run.storage={runs}", f"run.name={run_name(stage, tag, own)}"]
    return paths


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
