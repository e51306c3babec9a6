"""Validation: every --eval-interval iterations and at the last, the mean loss of the first
--eval-iters global batches of the blend and of each domain; a loss that is not finite ends the run
before any save."""

from __future__ import annotations

import math
import time

from ...data.loader import eval_batches
from ..metrics import MetricsLogger
from ..run_control import TrainingStopped
from ..run_state import RunState


def evaluation_due(state: RunState, eval_interval: int) -> bool:
    """Validation and downstream scoring: every `eval_interval` iterations and at the last, unless
    a stop signal came (the job's last seconds go to saving)."""
    return not state.stop.preempted and (state.iteration % eval_interval == 0 or state.at_end)


def validation_sets(data) -> dict:
    """'all' (the blend) and one per domain; a single-prefix run has only 'all'."""
    sets = {"all": data.valid} if data.valid is not None else {}
    sets.update(data.valid_per_domain)
    return sets


def evaluate(cfg, engine, datasets: dict, dp_rank: int, dp_size: int) -> dict:
    """Mean loss of the first --eval-iters global batches of each validation set."""
    results = {}
    for name, dataset in datasets.items():
        losses = [engine.evaluate(gb) for gb in eval_batches(cfg, dataset, dp_rank=dp_rank, dp_size=dp_size)]
        results[name] = sum(losses) / len(losses)
    return results


class Validation:
    def __init__(self, cfg, engine, metrics: MetricsLogger, sets: dict, dp_rank: int, dp_size: int):
        self.cfg, self.engine, self.metrics, self.sets = cfg, engine, metrics, sets
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def due(self, state: RunState) -> bool:
        return bool(self.sets) and self.cfg.train.eval_iters > 0 and evaluation_due(state, self.cfg.train.eval_interval)

    def run(self, state: RunState) -> None:
        iteration = state.iteration
        with self.engine.timers("evaluation"):
            losses = evaluate(self.cfg, self.engine, self.sets, self.dp_rank, self.dp_size)
        state.validation.append(dict(iteration=iteration, **losses))
        self.metrics.log_eval(iteration, state.consumed_samples, losses)
        # the evaluation's time is not the next train log's
        state.window_start = time.perf_counter()
        # the same global losses on every rank: all raise together, before any save
        broken = {name: loss for name, loss in losses.items() if not math.isfinite(loss)}
        if broken:
            names = ", ".join(f"lm loss validation{'' if n == 'all' else '/' + n} {v}" for n, v in broken.items())
            raise TrainingStopped(f"validation loss is not finite at iteration {iteration} ({names}): the "
                                  "model diverged; no checkpoint was saved")
