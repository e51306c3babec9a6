"""What the training loop does about bad steps: iterations to skip, loss spikes, rollbacks.

- `--iterations-to-skip I ...` (Megatron-LM's): those iterations read their global batch and do
  not train on it (no forward, backward, update or scheduler step); the iteration and the consumed
  samples advance. They are not counted as skipped steps (nothing failed).
- `--check-for-spiky-loss` (`spikes.py`) with `--spike-action`: `log` says so; `skip` does not apply
  the spike's update (`Engine.step`'s judge), which counts as a skipped step as an inf/NaN one does
  (a run that spikes at every step stops at `--max-skipped-steps`); `rollback` does not apply it
  either, reloads the newest checkpoint of the run (weights, optimizer, scheduler, loss scale, RNG),
  recreates the data at that checkpoint's consumed samples and adds the iterations of a window that
  ends at the spike (`--spike-rollback-window`) to the iterations to skip: the run then equals,
  bitwise, a fresh run given those iterations with `--iterations-to-skip`. Iterations of the window
  at or before the checkpoint cannot be skipped (they are in its weights); the log line says so.
  The rollbacks and the iterations they skip are kept in every later checkpoint's train state
  (`rollbacks`, `rolled_back_iterations`): a resumed run keeps skipping them, and `--max-rollbacks`
  bounds the run's rollbacks over all its launches (past it, exit code 1).

The checkpoint rolled back to: the newest this run saved (the `--keep-last` pruning always keeps the
newest), or the one it resumed from when it saved none yet (not one it started from with
`--finetune`, `--no-load-optim` or `--no-load-rng`: that is not the state the run had). Without
one, the spike is skipped instead, with one line that says so.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

from ..checkpoint.layout import checkpoint_dir
from .console import print0
from .engine import NONFINITE, StepResult
from .run_control import RunControl, TrainingStopped
from .run_state import RunState
from .spikes import SpikeGuard

LIST_SKIP = "--iterations-to-skip"


class RestartableBatches:
    """The loop's training batches (`TrainBatches`), which a rollback restarts at another position."""

    def __init__(self, make: Callable[[int], object], consumed_samples: int):
        """`make(consumed_samples)`: the batches from that position on."""
        self._make = make
        self._batches = make(consumed_samples)

    def __iter__(self):
        return self

    def __next__(self) -> list:
        return next(self._batches)

    @property
    def consumed_samples(self) -> int:
        return self._batches.consumed_samples

    def restart_at(self, consumed_samples: int) -> None:
        self._batches.close()
        self._batches = self._make(consumed_samples)

    def close(self) -> None:
        self._batches.close()


def iterations_to_skip(cfg) -> set[int]:
    return {int(i) for i in cfg.train.iterations_to_skip or []}


class BadSteps:
    def __init__(self, cfg, state: dict, kept: dict, checkpoints=None, metrics=None):
        """`state`: the train state the run resumed (empty for a fresh run); `kept`: what the saving
        job writes into every checkpoint besides the data position (updated here after a rollback)."""
        t = cfg.train
        self.cfg, self.kept, self.checkpoints, self.metrics = cfg, kept, checkpoints, metrics
        self.spikes = SpikeGuard.from_config(cfg)
        self.rollback = self.spikes is not None and t.spike_action == "rollback"
        self.rollbacks = int(state.get("rollbacks", 0))
        self.rolled_back = set(state.get("rolled_back_iterations", ()))
        self.skip = iterations_to_skip(cfg) | self.rolled_back
        if self.rollbacks:
            self._keep()
        c = cfg.checkpoint
        resumed_whole = state.get("iteration") and not (c.finetune or c.no_load_optim or c.no_load_rng)
        # the checkpoint this run started from, while it has saved none of its own
        self.started_from = (state.get("iteration"), state.get("loaded_from")) if resumed_whole else None

    @property
    def judge(self) -> Optional[Callable]:
        return self.spikes.judge if self.spikes is not None else None

    # -- iterations to skip --------------------------------------------------------------------
    def skips(self, iteration: int) -> bool:
        return iteration in self.skip

    def skipped(self, iteration: int, engine) -> StepResult:
        """The result of an iteration skipped by the list (no loss, no gradient norm), and its line."""
        why = "a rollback's window" if iteration in self.rolled_back else LIST_SKIP
        print0(f"iteration {iteration} skipped ({why}): its global batch is read and not trained on")
        return StepResult(loss=math.nan, grad_norm=math.nan, skipped=True, lr=engine.optimizer.param_groups[0]["lr"],
                          why=why)

    # -- after a computed step -------------------------------------------------------------------
    def after_step(self, run: RunState, iteration: int, result: StepResult, batches: RestartableBatches,
                   control: RunControl) -> bool:
        """Report what went wrong with the step of `iteration`; True when the run rolled back (the
        loop goes on from the checkpoint's iteration, without this one's jobs)."""
        if result.recomputed is not None:
            where = result.recomputed or "no rank's own loss (the gradients reduced over the ranks)"
            if result.why == NONFINITE:
                print0(f"iteration {iteration}: {NONFINITE} (not finite: {where}), again when recomputed on the same "
                       "batch and weights: the iteration is skipped")
            else:
                print0(f"iteration {iteration}: a transient fault: {NONFINITE} (not finite: {where}), finite when "
                       "recomputed on the same batch and weights: the recomputed step is applied")
        spike = self.spikes.seen(iteration, result) if self.spikes is not None else None
        if spike is None:
            return False
        action = self.spikes.action
        if action == "log":
            print0(f"iteration {iteration}: {spike} (--spike-action log: the step is applied)")
            return False
        if action == "skip":
            print0(f"iteration {iteration}: {spike}: its update is not applied (--spike-action skip)")
            return False
        return self._roll_back(run, iteration, spike, batches, control)

    # -- rollback ----------------------------------------------------------------------------------
    def _anchor(self, run: RunState) -> Optional[tuple[int, str]]:
        """(iteration, directory) of the checkpoint to roll back to, or None."""
        if run.last_saved > run.start_iteration:
            return run.last_saved, checkpoint_dir(self.cfg.checkpoint.save, run.last_saved)
        if self.started_from is not None and run.last_saved == self.started_from[0]:
            return self.started_from
        return None

    def _roll_back(self, run: RunState, iteration: int, spike: str, batches: RestartableBatches,
                   control: RunControl) -> bool:
        limit = self.cfg.train.max_rollbacks
        if self.rollbacks >= limit:
            raise TrainingStopped(f"iteration {iteration}: {spike}, after {self.rollbacks} rollbacks of this run "
                                  f"(--max-rollbacks {limit}): stopping")
        anchor = self._anchor(run)
        if anchor is None:
            print0(f"iteration {iteration}: {spike}; --spike-action rollback: this run has no checkpoint in --save "
                   f"{self.cfg.checkpoint.save} to roll back to yet, so the step is skipped instead (its update is not "
                   "applied)")
            return False
        self.checkpoints.wait()  # an async save of that checkpoint is complete before it is read
        state = self._load(anchor[1])
        back_to = state["iteration"]
        first = iteration - self.cfg.train.spike_rollback_window + 1
        skipped = list(range(max(first, back_to + 1), iteration + 1))
        self.rollbacks += 1
        self.rolled_back.update(skipped)
        self.skip.update(skipped)
        self._keep()

        # the run as it was at the checkpoint
        del run.losses[max(back_to - run.start_iteration, 0):]
        run.iteration, run.consumed_samples = back_to, state["consumed_samples"]
        run.skipped_total = state.get("skipped_total", 0)
        run.last_saved, run.save_owed = back_to, False
        control.consecutive_skipped = 0  # no checkpoint is saved right after a skipped iteration
        batches.restart_at(run.consumed_samples)
        self.spikes.detector.forget_after(back_to)
        run.restart_window()

        line = (f"iteration {iteration}: {spike}: rolled back to the checkpoint of iteration {back_to} ({anchor[1]}); "
                f"{_iterations(skipped[0], skipped[-1])} will be skipped")
        if first <= back_to:
            verb = "precede" if first < back_to else "precedes"
            line += (f"; {_iterations(first, back_to)} of the --spike-rollback-window {verb} that checkpoint: "
                     "not skipped")
        print0(f"{line} (rollback {self.rollbacks} of --max-rollbacks {limit})")
        if self.metrics is not None and self.metrics.is_writer:
            self.metrics.log_event(dict(iteration=iteration, rollback=dict(
                reason=spike, to_iteration=back_to, checkpoint=anchor[1], skipped_iterations=skipped,
                not_skipped=list(range(first, back_to + 1)) if first <= back_to else [], rollbacks=self.rollbacks)))
        return True

    def _load(self, ckpt: str) -> dict:
        """The whole training state of `ckpt`, whatever this launch's load flags were (`--finetune`,
        `--no-load-optim`, `--no-load-rng` are about where a run starts, not about going back)."""
        manager, cfg = self.checkpoints, self.checkpoints.cfg
        manager.cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(
            cfg.checkpoint, finetune=False, extend_context=False, no_load_optim=False, no_load_rng=False))
        try:
            return manager.load(ckpt)
        finally:
            manager.cfg = cfg

    def _keep(self) -> None:
        self.kept.update(rollbacks=self.rollbacks, rolled_back_iterations=sorted(self.rolled_back))


def _iterations(first: int, last: int) -> str:
    return f"iterations {first}-{last}" if last > first else f"iteration {first}"
