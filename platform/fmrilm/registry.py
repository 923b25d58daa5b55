"""Job kinds: a spec's ``kind`` names the pydantic model that validates it and the function
``run(spec) -> artifacts`` that executes it. The CLI and a Ray Jobs entrypoint both go through
here, so a spec runs the same way locally and on a cluster."""

from __future__ import annotations

from typing import Callable

from fmrilm.config import ConfigError

def _quickstart():
    from fmrilm.quickstart import QuickstartSpec, run

    return QuickstartSpec, run


def _science():
    from fmrilm.science import ScienceSpec, run

    return ScienceSpec, run


def _features():
    from fmrilm.features.job import FeaturesSpec, run

    return FeaturesSpec, run


def _tokenizer():
    from fmrilm.train.tokenizer import TokenizerStageSpec, run

    return TokenizerStageSpec, run


def _tokenize():
    from fmrilm.tokens import TokenizeSpec, run

    return TokenizeSpec, run


def _pretrain():
    from fmrilm.train.lm import PretrainSpec, run

    return PretrainSpec, run


def _instruct():
    from fmrilm.train.instruct import InstructSpec, run

    return InstructSpec, run


def _eval():
    from fmrilm.eval.run import EvalSpec, run

    return EvalSpec, run


def _sweep():
    from fmrilm.tune.sweep import SweepSpec, run

    return SweepSpec, run


KINDS: dict[str, Callable] = {"quickstart": _quickstart, "science": _science, "features": _features, "tokenizer": _tokenizer, "tokenize": _tokenize,
                              "pretrain": _pretrain, "instruct": _instruct, "eval": _eval, "sweep": _sweep}


def job_for(kind: str | None, source: str = "<spec>"):
    """Return ``(spec model, run function)`` for a job kind."""
    if kind in KINDS:
        return KINDS[kind]()
    raise ConfigError(f"{source}: kind: {kind!r} is not a job kind; use one of {sorted(KINDS)}")


def load_job(spec_uri: str, overrides: list[str], kind: str | None = None):
    """``(spec, run function, submit spec)`` of a job YAML with dotted overrides; ``kind`` is what
    a stage command expects (the YAML may leave it out, but may not name another). The optional
    ``submit:`` section is validated here and used only by ``fmrilm submit``."""
    from fmrilm import config
    from fmrilm.submit import SubmitSection

    data = config.apply_overrides(config.load_yaml(spec_uri), overrides)
    if kind is not None:
        if data.setdefault("kind", kind) != kind:
            raise ConfigError(f"{spec_uri}: kind {data['kind']!r}, but this command runs {kind!r} specs (use `fmrilm run`)")
    submit = config.build(SubmitSection, {"submit": data.pop("submit", None) or {}}, spec_uri).submit
    model, fn = job_for(data.get("kind"), spec_uri)
    return config.build(model, data, spec_uri), fn, submit
