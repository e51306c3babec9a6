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
        elapsed = time.perf_counter() - state.window_start
        # a collective over every rank (the train log is due on all alike), read once per log
        params_norm = float(self.engine.params_norm()) if self.cfg.logging.log_params_norm else None
        by_domain = self.engine.domain_losses
        loss_per_domain = by_domain.reduce() if by_domain is not None else None  # one all-reduce
        self.metrics.log_train(state.iteration, consumed, state.step, elapsed,
                               state.window_steps, state.skipped_total,
                               loss_scale=self.engine.scaler.loss_scale if self.cfg.train.fp16 else None,
                               per_domain=self.samples.named(self.samples.consumed_per_domain(consumed)),
                               params_norm=params_norm, loss_per_domain=loss_per_domain)
        timing = self.engine.timers.report(state.window_steps)  # one small collective, at level 1 or 2
        if timing is not None:
            self.metrics.log_report(state.iteration, consumed, "timers", *timing)
        state.restart_window()
