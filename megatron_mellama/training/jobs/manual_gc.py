"""Manual garbage collection (`--manual-gc`, `--manual-gc-interval N`, Megatron-LM's flags and
meaning): Python's automatic collector is off for the run, and a full collection runs on every rank
at the same iteration instead of whenever each rank's allocation count decides (a collection of a
large heap takes long enough to make that rank a straggler that every other rank waits for).

Collections: one when training starts, every N iterations (N > 0), and before every evaluation and
checkpoint save (with N = 0 only those, as Megatron-LM's default). The due decision reads the run
state alone, the same on every rank. `collecting(cfg)` restores the collector's state at the end.
"""

from __future__ import annotations

import contextlib
import gc

from ..run_state import RunState


@contextlib.contextmanager
def collecting(cfg):
    """With --manual-gc: the automatic collector off inside, as it was before afterwards."""
    if not cfg.train.manual_gc:
        yield
        return
    was_enabled = gc.isenabled()
    gc.disable()
    gc.collect()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class ManualGC:
    def __init__(self, cfg, before: list):
        """`before`: the jobs (evaluations, saving) a collection precedes whenever they are due."""
        self.enabled, self.interval, self.before = cfg.train.manual_gc, cfg.train.manual_gc_interval, before

    def due(self, state: RunState) -> bool:
        if not self.enabled:
            return False
        periodic = self.interval > 0 and state.iteration % self.interval == 0
        return periodic or any(job.due(state) for job in self.before)

    def run(self, state: RunState) -> None:
        gc.collect()
