"""The specs every training stage shares: where a run lives (``RunSpec``), how many Ray Train
workers it takes (``ScalingSpec``), and a spec as the dict workers rebuild it from."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fmrilm import storage
from fmrilm.config import RUN_NAME, RunLocation, Strict


class ScalingSpec(Strict):
    """Ray Train workers and where Ray places them. On a small machine keep cpus_per_worker fractional:
    workers that take every CPU leave none for the Ray Data read tasks that feed them."""

    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    placement: Literal["pack", "spread", "strict_spread"] = Field(
        "pack", description="pack: as few nodes as fit the workers; spread: one worker per node where the cluster allows; "
                            "strict_spread: one worker per node or the run waits for nodes")

    @property
    def placement_strategy(self) -> str:
        """Ray's name of :attr:`placement` (``PACK``, ``SPREAD``, ``STRICT_SPREAD``)."""
        return self.placement.upper()


class RunSpec(RunLocation):
    """Where a training run lives (``<storage>/<name>/``; the same name resumes) and how it runs."""

    name: str = Field("tokenizer", pattern=RUN_NAME)
    max_failures: int = Field(0, ge=-1, description="worker failures to recover from (-1: unlimited)")
    keep_checkpoints: int = Field(2, ge=1)
    logger: Literal["tensorboard", "none"] = "tensorboard"
    log_dir: str = Field("./fmrilm-data/tensorboard", description="local folder for TensorBoard event files")
    allow_new_data: bool = Field(False, description="resume even though the datasets were re-ingested since the checkpoints were written")


def worker_spec(spec) -> dict:
    """A spec as the dict Ray workers rebuild it from, local paths made absolute: a worker's
    working directory is not the driver's, so ``./fmrilm-data/...`` would land elsewhere (what
    counts as a local path: :func:`fmrilm.storage.is_local_path`)."""
    def fix(value):
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, str) and storage.is_local_path(value):
            return storage.absolute(value)
        return value

    return fix(spec.model_dump(mode="json"))
