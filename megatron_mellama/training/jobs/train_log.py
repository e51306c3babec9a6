"""The train log: every --log-interval iterations, and at the first and last, the metrics line."""

from __future__ import annotations

import time

from ..metrics import MetricsLogger
from ..run_state import RunState


class TrainLog:
    def __init__(self, cfg, metrics: MetricsLogger, engine, samples):
        self.cfg, self.metrics, self.engine, self.samples = cfg, metrics, engine, samples

    def due(self, state: RunState) -> bool:
        return state.iteration % self.cfg.logging.log_interval == 0 or state.iteration in (1, state.iterations)

    def run(self, state: RunState) -> None:
        consumed = state.consumed_samples
        self.metrics.log_train(state.iteration, consumed, state.step, time.perf_counter() - state.window_start,
                               state.window_steps, state.skipped_total,
                               loss_scale=self.engine.scaler.loss_scale if self.cfg.train.fp16 else None,
                               per_domain=self.samples.named(self.samples.consumed_per_domain(consumed)))
        state.restart_window()
