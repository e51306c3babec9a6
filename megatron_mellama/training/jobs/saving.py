"""Checkpoint saving: every --save-interval iterations, at a stop that asks for a save, and at the
last iteration, with the data position and the skipped count.

A checkpoint is never written right after a skipped iteration, nor of weights that are not finite
(the rules in `../run_control.py`): a periodic save waits for the next good iteration (`save_owed`),
a save for a stop fails the run instead."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ...checkpoint.layout import CheckpointError, checkpoint_dir, latest_iteration
from ...checkpoint.manager import CheckpointManager
from ..console import print0
from ..run_control import RunControl, TrainingStopped
from ..run_state import RunState


class CheckpointSaving:
    def __init__(self, cfg, engine, checkpoints: CheckpointManager, control: RunControl, samples, kept: dict):
        """`kept`: what a checkpoint keeps besides the data position and the skipped count."""
        self.cfg, self.engine, self.checkpoints, self.control = cfg, engine, checkpoints, control
        self.samples, self.kept = samples, kept

    def due(self, state: RunState) -> bool:
        interval = self.cfg.checkpoint.save_interval
        periodic = interval and state.iteration % interval == 0
        due = periodic or state.save_owed or state.stop.save or state.at_end
        return bool(self.cfg.checkpoint.save and due and state.last_saved != state.iteration)

    def run(self, state: RunState) -> None:
        state.save_owed = self._unsaveable(state)
        if not state.save_owed:
            consumed = state.consumed_samples
            with self.engine.timers("save-checkpoint"):
                self.checkpoints.save(state.iteration, consumed, dict(self.kept, skipped_total=state.skipped_total,
                                                                      data_order=self.samples.state(consumed)))
            state.last_saved = state.iteration

    def _unsaveable(self, state: RunState) -> bool:
        """Whether the checkpoint of this iteration must wait (a periodic save after a skipped
        iteration); raises TrainingStopped where it cannot wait (a stop) or the weights are broken.

        Every rank decides the same: the skipped-step count is global and the weight check reduces."""
        iteration, stop = state.iteration, state.stop
        if self.control.last_step_skipped():
            skipped = (f"iteration {iteration} was skipped (inf/NaN loss or gradients, or a loss spike): its weights "
                       f"are the ones that gave it, and are not saved")
            if stop.save:
                raise TrainingStopped(f"{stop.reason}, but {skipped}; {newest_checkpoint(self.cfg)}")
            print0(f"{skipped} yet; the checkpoint waits for the next iteration that is not skipped")
            return True
        if not weights_finite(self.engine):
            raise TrainingStopped(f"a weight is not finite after iteration {iteration} (an inf/NaN update): the "
                                  f"model diverged; no checkpoint was saved; {newest_checkpoint(self.cfg)}")
        return False


def newest_checkpoint(cfg) -> str:
    try:
        newest = latest_iteration(cfg.checkpoint.save)
    except CheckpointError:
        newest = None
    if newest is None:
        return f"--save {cfg.checkpoint.save} holds no checkpoint"
    return f"the newest checkpoint is {checkpoint_dir(cfg.checkpoint.save, newest)}"


def weights_finite(engine) -> bool:
    """Whether every parameter of every rank is finite. Each rank checks its own shards on its
    device; one MIN all-reduce and one host read, once per save, not per step."""
    flags = [torch.isfinite(_local_shard(p)).all() for m in engine.modules for p in m.parameters()]
    ok = (torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=engine.device))
    ok = ok.to(torch.int32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _local_shard(param: torch.Tensor) -> torch.Tensor:
    # FSDP2 and tensor parallelism hold DTensors: this rank's shard, without communication
    return param.to_local() if isinstance(param, DTensor) else param
