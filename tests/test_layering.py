"""The package's layering, mostly read from the source: module names never shadow the
standard library, and the layers that load trained artifacts (artifacts/, eval/, tokens.py, the
models) import nothing from train/, and one stage table serves every reader of job kinds."""

import ast
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "platform" / "fmrilm"


def _imports(path: pathlib.Path) -> set[str]:
    """Every absolute module name a file imports, at any depth (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_no_module_shadows_the_standard_library():
    # the package folder lands on sys.path when a module in it runs as a script: `tokenize.py`
    # there replaced the stdlib's tokenize (imported by inspect, linecache, ...)
    shadowing = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                       if p.stem in sys.stdlib_module_names and p.parent == PACKAGE)
    assert shadowing == []


def test_artifact_readers_import_nothing_from_train():
    readers = [*PACKAGE.glob("artifacts/*.py"), *PACKAGE.glob("eval/*.py"), *PACKAGE.glob("models/*.py"),
               *PACKAGE.glob("features/*.py"), *PACKAGE.glob("data/*.py"), PACKAGE / "tokens.py"]
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in _imports(p) if n == "fmrilm.train" or n.startswith("fmrilm.train."))
                 for p in readers}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert len(readers) > 20


def test_later_stages_read_stores_not_the_jobs_that_wrote_them():
    # what `fmrilm features build` and `fmrilm tokenize` commit is read through features/store.py
    # and artifacts/tokens.py; their job modules are reached only through the stage table
    jobs = {"fmrilm.features.job", "fmrilm.tokens"}
    importers = {str(p.relative_to(PACKAGE)): sorted(_imports(p) & jobs) for p in PACKAGE.rglob("*.py")}
    assert {k: v for k, v in importers.items() if v} == {}


def test_models_take_plain_arguments_not_specs():
    # torchtune's rule: configs do not intrude into model classes; a job spec validates the
    # models' dataclasses (bounds included) without the models knowing the config system
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in _imports(p) if n.split(".")[0] == "pydantic" or n == "fmrilm.config")
                 for p in PACKAGE.glob("models/*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_a_models_dataclass_in_a_spec_is_validated_like_a_spec():
    import pytest

    from fmrilm.config import ConfigError, build
    from fmrilm.train.tokenizer import TokenizerStageSpec

    assert build(TokenizerStageSpec, {"model": {"num_codes": 64}, "data": {"window": 32}}).model.num_codes == 64
    with pytest.raises(ConfigError, match="model.num_codez: unknown key"):
        build(TokenizerStageSpec, {"model": {"num_codez": 64}})
    with pytest.raises(ConfigError, match=r"alignment.temperature: Input should be greater than 0"):
        build(TokenizerStageSpec, {"alignment": {"temperature": 0}})


def test_a_checkpoints_shape_records_the_models_dataclasses():
    import json

    from fmrilm.models.lora import LoraSpec
    from fmrilm.models.tokenizer import TokenizerConfig
    from fmrilm.train.checkpoints import check_shape, shape_of

    shape = json.loads(json.dumps(shape_of(model=TokenizerConfig(num_codes=64), lora=LoraSpec(target_modules=["c_attn"]))))
    assert shape["model.num_codes"] == 64 and shape["lora.target_modules"] == ["c_attn"]
    check_shape({"shape": shape}, shape_of(model=TokenizerConfig(num_codes=64), lora=LoraSpec(target_modules=["c_attn"])), "ckpt")


def test_one_stage_table_names_every_job_and_the_quickstart_chain():
    from fmrilm.quickstart import QuickstartSpec
    from fmrilm.registry import JOBS, PIPELINE, SWEEPABLE, chain_paths, load_job, own_stages
    from fmrilm.tune.sweep import stage_of

    for kind, job in JOBS.items():
        model, run = job.load()
        assert model.model_fields["kind"].default == kind and callable(run) and callable(job.summary())
    assert all(callable(JOBS[stage].check()) for stage in PIPELINE if stage != "ingest")
    assert set(PIPELINE) - {"ingest"} <= set(JOBS) and QuickstartSpec().stages == list(PIPELINE)
    assert SWEEPABLE == {"tokenizer": "val/r2", "instruct": "val/loss"}
    # a chain's paths come from the table: each input is the output of the stage named for it
    assert chain_paths("eval", "s3://b/q", "-x") == ["data.root=s3://b/q/datasets", "model=s3://b/q/runs/instruct-x/model",
                                                    "kshot=s3://b/q/runs/kshot-x", "run.storage=s3://b/q/runs", "run.name=eval-x"]
    assert chain_paths("tokenize", "s3://b/q", "-x") == ["data.root=s3://b/q/datasets", "tokenizer=s3://b/q/runs/tokenizer/tokenizer"]
    # a variant with its own tokenizer runs the tokenizer and what reads it under its tag; its LM reads that one
    assert own_stages({"tokenizer", "instruct"}) == {"tokenizer", "tokenize"} and own_stages({"pretrain"}) == set()
    own = {"tokenizer": "-t", "tokenize": "-t"}  # variants x and y share the tokenizer run named tokenizer-t
    assert chain_paths("tokenizer", "s3://b/q", "-x", own)[-1] == "run.name=tokenizer-t"
    assert chain_paths("pretrain", "s3://b/q", "-y", own)[1:] == ["tokenizer=s3://b/q/runs/tokenizer-t/tokenizer", "run.storage=s3://b/q/runs",
                                                                  "run.name=pretrain-y"]
    for stage in PIPELINE[1:]:
        load_job(f"jobs/{stage}.yaml", chain_paths(stage, "s3://b/q", "-x"), stage)  # every key exists in its spec
    assert all(callable(stage_of(name).check) for name in SWEEPABLE)


def test_user_errors_of_pure_and_driver_code_are_user_errors():
    import numpy as np
    import pytest

    from fmrilm.errors import UserError
    from fmrilm.features.descriptors import build_reference
    from fmrilm.artifacts.tokens import ScanNotTokenized

    with pytest.raises(UserError, match="train split is empty"):
        build_reference([], ["A"], [])
    with pytest.raises(UserError, match="ROI->network map has 1 entries but scans have 3 ROIs"):
        build_reference([np.zeros((3, 20))], ["A"], ["s"])
    assert str(ScanNotTokenized("scan 'x' has no tokens")) == "scan 'x' has no tokens"


def test_no_import_cycles_even_through_lazy_imports():
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph = {m: {n for n in _imports(p) if n in modules} for m, p in modules.items()}

    def reaches(start, goal, seen):
        return any(n == goal or (n not in seen and not seen.add(n) and reaches(n, goal, seen)) for n in graph[start])

    cycles = sorted(m for m in graph if reaches(m, m, set()))
    assert cycles == []
