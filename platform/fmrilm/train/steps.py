"""The step skeleton every training recipe shares (the tokenizer's, the LM stages'): how many
optimizer steps a run has, the batches left after a resume, when a step reports and when it
checkpoints, the console's progress line, and the per-step values averaged between two reports. The
recipes keep what differs: the model, the optimizer step, what a report holds and how a checkpoint
is written."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator

from fmrilm.train.optim import OptimSpec

PROGRESS_FIGURES = ("loss", "val/loss", "val/r2", "val/fc_preservation", "val/perplexity")  # what a progress line shows, where reported


@dataclass
class Steps:
    """Where a run stands: ``per_epoch`` optimizer steps per epoch on one rank, ``total`` in the
    run, ``done`` so far (the resumed checkpoint's step, then counted up by the recipe)."""

    per_epoch: int
    total: int
    log_every: int
    checkpoint_every: int
    done: int = 0
    _clock: tuple[int, float] | None = field(default=None, repr=False)  # (step, time) of the first report
    _shown: int = field(default=0, repr=False)  # the step of the last progress line
    _shown_at: float = field(default=0.0, repr=False)  # and its time

    @classmethod
    def plan(cls, rows_per_rank: int, rows_per_step: int, train: OptimSpec) -> "Steps":
        """The steps of a run over ``rows_per_rank`` rows, ``rows_per_step`` rows per optimizer
        step (batch x gradient accumulation), ``train.epochs`` epochs capped at ``train.max_steps``."""
        per_epoch = max(1, math.ceil(rows_per_rank / rows_per_step))
        total = min(train.epochs * per_epoch, 10**12 if train.max_steps is None else train.max_steps)
        return cls(per_epoch, total, train.log_every, train.checkpoint_every)

    @property
    def epoch(self) -> float:
        return self.done / self.per_epoch

    def batches(self, shard, batch_size: int, epochs: int, micro_per_step: int = 1, **stream) -> Iterator[dict]:
        """The batches left of the run from a Ray Data ``shard``: the epochs from the resumed one
        on, skipping the batches of that epoch already trained on (``micro_per_step`` batches per
        optimizer step), until ``total`` steps are done. ``stream``: :func:`epoch_stream`'s
        ``collate_fn`` / ``pin_memory``."""
        from fmrilm.data.pipeline import epoch_stream

        first = self.done // self.per_epoch
        skip = (self.done - first * self.per_epoch) * micro_per_step
        for epoch, i, batch in epoch_stream(shard, batch_size, first, epochs, **stream):
            if self.done >= self.total:  # also when resumed from the final checkpoint
                return
            if epoch == first and i < skip:
                continue
            yield batch

    def checkpoint_due(self, final: bool = False) -> bool:
        """Whether the report after this step carries a checkpoint (and validation)."""
        return final or self.done % self.checkpoint_every == 0

    def report_due(self) -> bool:
        """Whether this step reports: every ``log_every`` and ``checkpoint_every`` steps, except
        the last one, which the final report covers."""
        return self.done < self.total and (self.done % self.log_every == 0 or self.checkpoint_due())

    def progress(self, metrics: dict, parts: int = 10, every_s: float = 30.0, now: float | None = None) -> str | None:
        """The console's line on a report at most every ``1 / parts`` of the run and ``every_s``
        seconds, and at its end: step of total, the figures of :data:`PROGRESS_FIGURES` in
        ``metrics``, minutes spent and left (from the pace since the first report); ``None``
        between. The first call (the first report) only starts the clock; ``now``: the time (tests)."""
        now = time.perf_counter() if now is None else now
        if self._clock is None:
            self._clock, self._shown, self._shown_at = (self.done, now), self.done, now
            return None
        first, started = self._clock
        if self.done < self.total and (self.done - self._shown < max(1, self.total // parts) or now - self._shown_at < every_s):
            return None
        spent = now - started
        left = spent / max(1, self.done - first) * (self.total - self.done)
        figures = ", ".join(f"{k} {metrics[k]:.3f}" for k in PROGRESS_FIGURES if isinstance(metrics.get(k), (int, float)))
        self._shown, self._shown_at = self.done, now
        return (f"step {self.done}/{self.total} ({self.done / max(1, self.total):.0%})" + (f", {figures}" if figures else "")
                + f", {spent / 60:.1f} min" + (f", about {left / 60:.1f} min left" if self.done < self.total else ""))


@dataclass
class Running:
    """Per-step values (losses, loss terms) summed between two reports."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0.0) + 1

    def means(self) -> dict[str, float]:
        """The mean of each value over the steps since the last :meth:`clear` (this rank's)."""
        return {k: v / self.counts[k] for k, v in self.sums.items()}

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()
