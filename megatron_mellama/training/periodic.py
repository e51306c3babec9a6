"""Periodic jobs: the training loop's duties besides stepping, one class each.

After every iteration the loop updates the run state (`run_state.py`) and then asks each job of its
list, in order, whether it is due, and runs it if so:

    train log -> stopping -> manual GC -> replica check -> validation -> downstream scoring
    -> checkpoint saving

The order is part of the behaviour: the stop decision is taken before evaluating (a preempted job
has seconds left, and spends them saving, so the evaluations skip), the replica check and a
non-finite validation loss or downstream score raise before any save, and the save comes last so a
stop saves the iteration's weights. After the jobs, the loop ends when the stop decision (`state.stop`) says stop.

A job may raise `TrainingStopped` (`run_control.py`) to end the run as a failure; to end it gracefully
it sets `state.stop` (a `StopDecision`) before the saving job runs. A job that runs a collective must
be due on every rank alike (decide from the state, which is the same everywhere, or reduce).

Adding a duty (spike detection, straggler reports, profiling, an experiment tracker): a class with
`due(state)` and `run(state)` in a new file in `jobs/`, and one line in `loop.periodic_jobs` at its
place in the order.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

from .run_state import RunState


class PeriodicJob(Protocol):
    def due(self, state: RunState) -> bool:
        """Whether the job runs after the iteration `state` has just finished (no side effects)."""

    def run(self, state: RunState) -> None:
        """Do the job; reads and updates `state`."""


def run_due_jobs(jobs: list[PeriodicJob], state: RunState,
                 before: Optional[Callable[[PeriodicJob], None]] = None) -> None:
    """`before(job)`: called as each due job starts (the hang watchdog's phase, `hang_watchdog.py`)."""
    for job in jobs:
        if job.due(state):
            if before is not None:
                before(job)
            job.run(state)
