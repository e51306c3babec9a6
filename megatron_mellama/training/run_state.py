"""The state of one run: what the training loop and its periodic jobs (`periodic.py`) read and change.

The loop writes the step's part (iteration, consumed samples, the step's result, skipped count,
losses, the timing window); each job reads it and writes its own part (the stop decision, the
validation and downstream records, the last save). `history()` is what `train()` returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .run_control import GO_ON, StopDecision

if TYPE_CHECKING:
    from .engine import StepResult


@dataclass
class RunState:
    iterations: int  # the iteration the run ends at (--train-iters, or --train-samples' count)
    iteration: int  # the newest finished iteration (the checkpoint's before the first step)
    consumed_samples: int
    skipped_total: int = 0  # skipped iterations since the run's first launch (kept in checkpoints)
    kernels: dict = field(default_factory=dict)  # the kernel backend chosen for each op
    start_iteration: int = 0
    losses: list[float] = field(default_factory=list)  # one per iteration of this launch
    validation: list[dict] = field(default_factory=list)  # {"iteration", "all", <domain>...}
    downstream: list[dict] | None = None  # {"iteration", <task>: scores}; None until a first scoring
    stopped: str | None = None  # why the run stopped before its end, if it did
    step: StepResult | None = None  # the newest iteration's result
    # this iteration's stop decision; the jobs after the one that takes it act on it (no
    # evaluation when preempted, a save when asked), and the loop ends after them when it stops
    stop: StopDecision = GO_ON
    window_start: float = field(default_factory=time.perf_counter)  # the train log's timing window
    window_steps: int = 0
    last_saved: int = 0  # the iteration of the newest checkpoint this run has (or started from)
    save_owed: bool = False  # a periodic save put off by a skipped iteration, made at the next good one

    @classmethod
    def starting_at(cls, iteration: int, consumed_samples: int, **values) -> "RunState":
        return cls(iteration=iteration, consumed_samples=consumed_samples, start_iteration=iteration,
                   last_saved=iteration, **values)

    @property
    def at_end(self) -> bool:
        return self.iteration == self.iterations

    def restart_window(self) -> None:
        self.window_start, self.window_steps = time.perf_counter(), 0

    def history(self) -> dict:
        """The run's record as `train()` returns it ("downstream" only where tasks were scored)."""
        history = dict(losses=self.losses, validation=self.validation, stopped=self.stopped,
                       start_iteration=self.start_iteration, kernels=self.kernels, iteration=self.iteration,
                       consumed_samples=self.consumed_samples)
        if self.downstream is not None:
            history["downstream"] = self.downstream
        return history
