"""Rank 0's TensorBoard event files of a training run."""

from __future__ import annotations

import math
import os

from fmrilm.train.specs import RunSpec


class MetricLog:
    """Rank-0 TensorBoard event files (a no-op elsewhere or when disabled)."""

    def __init__(self, run: RunSpec, rank: int):
        self.writer = None
        if run.logger == "tensorboard" and rank == 0:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run.log_dir, run.name))

    def log(self, metrics: dict, step: int) -> None:
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
