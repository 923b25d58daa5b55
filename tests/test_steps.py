"""The step skeleton both training recipes share: the plan of a run, the batches left after a
resume (none trained twice, none skipped), the report and checkpoint cadence, the console's
progress lines, running means."""

from fmrilm.train.optim import OptimSpec
from fmrilm.train.steps import Running, Steps


class Shard:
    """A dataset shard of ``rows`` numbered rows (what ``iter_torch_batches`` of Ray Data gives)."""

    def __init__(self, rows: int):
        self.rows = rows

    def iter_torch_batches(self, batch_size, **_):
        for start in range(0, self.rows, batch_size):
            yield {"row": list(range(start, min(start + batch_size, self.rows)))}


def _trained(steps: Steps, shard: Shard, batch: int, epochs: int, micro: int = 1) -> list[list[int]]:
    seen, count = [], 0
    for b in steps.batches(shard, batch, epochs, micro):
        seen.append(b["row"])
        count += 1
        if count % micro == 0:
            steps.done += 1
    return seen


def test_a_plan_caps_at_max_steps_and_counts_accumulated_batches_as_one_step():
    assert (Steps.plan(10, 4, OptimSpec(epochs=3)).per_epoch, Steps.plan(10, 4, OptimSpec(epochs=3)).total) == (3, 9)
    assert Steps.plan(10, 4, OptimSpec(epochs=3, max_steps=5)).total == 5
    none = Steps.plan(10, 4, OptimSpec(epochs=3, max_steps=0))  # the initialised model, exported untrained
    assert none.total == 0 and _trained(none, Shard(10), 4, 3) == []
    assert Steps.plan(16, 2 * 4, OptimSpec(epochs=2)).per_epoch == 2  # micro-batch 2, gradient accumulation 4


def test_a_resumed_run_trains_each_remaining_batch_once():
    whole = _trained(Steps.plan(10, 4, OptimSpec(epochs=2)), Shard(10), 4, 2)
    assert len(whole) == 6 and whole[3] == [0, 1, 2, 3]  # 3 batches per epoch, the second epoch from row 0
    for done in range(7):
        steps = Steps.plan(10, 4, OptimSpec(epochs=2))
        steps.done = done
        assert _trained(steps, Shard(10), 4, 2) == whole[done:] and steps.done == 6, done
    accumulated = Steps.plan(12, 2 * 2, OptimSpec(epochs=2))  # micro-batches of 2, two per step
    accumulated.done = 4  # one epoch and one step into the second
    assert _trained(accumulated, Shard(12), 2, 2, micro=2) == [[4, 5], [6, 7], [8, 9], [10, 11]] and accumulated.done == 6


def test_reports_follow_log_and_checkpoint_cadence_and_the_last_step_reports_once():
    steps = Steps(per_epoch=10, total=10, log_every=4, checkpoint_every=5)
    due = []
    for step in range(1, 11):
        steps.done = step
        due.append((step, steps.report_due(), steps.checkpoint_due()))
    assert [s for s, report, _ in due if report] == [4, 5, 8]  # 10 is the final report's
    assert [s for s, _, ckpt in due if ckpt] == [5, 10] and steps.checkpoint_due(final=True)


def test_progress_lines_come_at_most_every_tenth_of_the_run_and_half_minute_and_at_its_end():
    steps = Steps(per_epoch=100, total=100, log_every=5, checkpoint_every=50)
    lines = {}
    for step in range(5, 101, 5):
        steps.done = step
        line = steps.progress({"loss": 0.5, "val/r2": 0.25, "val/mse": 0.1, "lr": 1e-3, "precision": "fp32"}, now=step * 60.0)
        if line:
            lines[step] = line
    assert list(lines) == [15, 25, 35, 45, 55, 65, 75, 85, 95, 100]  # the first report (step 5) starts the clock
    assert lines[15].startswith("step 15/100 (15%), loss 0.500, val/r2 0.250, ") and "min left" in lines[15]
    assert "lr" not in lines[15] and "mse" not in lines[15] and "left" not in lines[100]
    fast = Steps(per_epoch=100, total=100, log_every=5, checkpoint_every=50)  # a short run: its end, not a line a tenth
    shown = []
    for step in range(5, 101, 5):
        fast.done = step
        shown += [step] if fast.progress({"loss": 0.5}, now=step * 0.1) else []
    assert shown == [100]


def test_running_means_average_each_value_over_its_own_steps():
    running = Running()
    running.add({"loss": 1.0, "loss/text": 2.0})
    running.add({"loss": 3.0})
    assert running.means() == {"loss": 2.0, "loss/text": 2.0}
    running.clear()
    assert running.means() == {}
