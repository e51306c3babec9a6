"""Downstream scoring: the --downstream-tasks' accuracies at each validation; a score that is not
finite ends the run before any save."""

from __future__ import annotations

import time

from ...evaluation.in_training import DownstreamNotFinite, DownstreamTasks
from ..metrics import MetricsLogger
from ..run_control import TrainingStopped
from ..run_state import RunState
from .validation import evaluation_due


class DownstreamScoring:
    def __init__(self, cfg, engine, metrics: MetricsLogger, tasks: DownstreamTasks | None, dp_rank: int,
                 dp_size: int):
        self.cfg, self.engine, self.metrics, self.tasks = cfg, engine, metrics, tasks
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def due(self, state: RunState) -> bool:
        return self.tasks is not None and evaluation_due(state, self.cfg.train.eval_interval)

    def run(self, state: RunState) -> None:
        iteration = state.iteration
        try:
            with self.engine.timers("evaluation"):
                scores = self.tasks.score(self.engine, self.dp_rank, self.dp_size)
        except DownstreamNotFinite as exc:
            # as a NaN validation loss: every rank raises together, before any save
            raise TrainingStopped(f"downstream evaluation at iteration {iteration}: {exc}: the model "
                                  "diverged; no checkpoint was saved") from None
        if state.downstream is None:
            state.downstream = []
        state.downstream.append(dict(iteration=iteration, **scores))
        self.metrics.log_downstream(iteration, state.consumed_samples, scores)
        state.window_start = time.perf_counter()
