"""How long a job may wait at a free replica for compatible jobs to share its pipeline call.

Dispatching the moment a replica is free sends the first of a burst of jobs alone and
batches only the rest (measured: 8 concurrent jobs ran as batches of 1 and 7). Waiting a
little lets the burst form one batch, but a fixed wait would be paid by every lone job. So
the wait is a fraction (5%) of the job's own expected run time, learned from the model's
finished lone calls, counted from the job's submission, and capped by the model's
`scaling.max_batch_wait_s`: a 1-step 64 px job waits about a millisecond, a 20-step one
long enough for a burst to arrive, and a job whose cost is not known yet (no lone job has
finished since the start) or that has already queued that long does not wait.
"""

from __future__ import annotations

from serve_app.messages import GenerationTask

# The wait, as a fraction of the expected run time of the job that waits: a job that
# waits in vain (nothing compatible came) took at most 5% longer.
WAIT_FRACTION = 0.05
# Weight of the newest call in the running cost estimate.
SMOOTHING = 0.3


def _work(task: GenerationTask) -> float:
    """Units of work in a task: images x steps x megapixels (both passes of a hires fix)."""
    return task.work


class BatchWindow:
    """Per model: the cost estimate, and how long a waiting job may be held."""

    def __init__(self, max_wait_ms: float) -> None:
        self.max_wait_ms = max_wait_ms
        self._ms_per_unit: float | None = None

    @property
    def ms_per_unit(self) -> float | None:
        return self._ms_per_unit

    def observe(self, tasks: list[GenerationTask], elapsed_ms: float) -> None:
        """One finished replica call: `tasks` ran together in `elapsed_ms`. The tracker
        feeds it lone jobs only: a hold is a fraction of what a job costs alone."""
        work = sum(_work(t) for t in tasks)
        if work <= 0 or elapsed_ms <= 0:
            return
        cost = elapsed_ms / work
        old = self._ms_per_unit
        self._ms_per_unit = cost if old is None else old + SMOOTHING * (cost - old)

    def wait_ms(self, task: GenerationTask) -> float:
        """How long `task` may wait, from its submission, for companions."""
        if self.max_wait_ms <= 0 or self._ms_per_unit is None:
            return 0.0
        return min(self.max_wait_ms, WAIT_FRACTION * self._ms_per_unit * _work(task))
