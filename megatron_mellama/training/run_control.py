"""When to stop: preemption signals, `--exit-interval`, `--exit-duration-in-mins`, and runs of
skipped (inf/NaN) steps.

Skipped steps: `--max-skipped-steps K` (default 10; Megatron-LM has no limit, and a run whose loss
went NaN there skips every step to the end, exits 0 and saves the broken weights) consecutive
skipped iterations stop the run with exit code 1 and no checkpoint; so does a run that ends inside
a streak of skipped iterations, however short (every one of its iterations skipped, or a divergence
in its last few). A checkpoint is never written right after a skipped iteration: its weights are the
ones that just gave an inf/NaN loss or gradients (a periodic save waits for the next good
iteration; a save for a stop signal or an exit limit fails the run instead). An fp16 overflow that
the dynamic loss scaler still answers by lowering the scale (the loss itself finite, the scale
above its minimum) is the scaler's normal work, not a failure: it neither counts nor breaks a run
of skipped steps (from the default initial scale 2**32 a healthy fp16 run skips a few dozen steps
while the scale comes down). `--max-skipped-steps 0` never stops, and saves what the last
iteration left, as Megatron-LM does (unless a weight is not finite: no run saves that).

SLURM (and most schedulers) send SIGTERM, or SIGUSR1 with `--signal=USR1@<secs>`, some time before
killing a job, to every process of the job: torchrun, the trainers and their data-loader workers
(which ignore both, see `data/loader.py`). The handler only raises a flag; the loop asks
`should_stop(iteration)` at each step boundary, where a checkpoint can be written safely. Any rank
may see a signal or the time limit first, so the decision is a MAX all-reduce: every rank stops,
and saves, at the same iteration. The handlers are installed when the run starts, before its
minutes of start-up: SIGUSR1 arriving then is kept (`preempted()` asks before the first step), while
SIGTERM and SIGINT end a process still in start-up at once (nothing trained, nothing lost; see
`stop_signals.py`).
"""

from __future__ import annotations

import signal
import time
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..errors import MellamaError
from .stop_signals import StopSignals


_SIGNAL, _INTERVAL, _DURATION = range(3)


class TrainingStopped(MellamaError, RuntimeError):
    """The run cannot go on (e.g. too many consecutive inf/NaN steps); the message says why."""


class StopDecision(NamedTuple):
    stop: bool
    reason: str
    save: bool
    preempted: bool  # a signal: the job has little time left (no evaluation, straight to saving)


GO_ON = StopDecision(False, "", False, False)


class RunControl:
    def __init__(self, cfg, install_handlers: bool = True, device: torch.device | str = "cpu",
                 signals: StopSignals | None = None):
        # where the stop flags are reduced: the run's device (NCCL reduces only device tensors)
        self.device = torch.device(device)
        self.exit_interval = cfg.train.exit_interval
        self.exit_duration_in_mins = cfg.train.exit_duration_in_mins
        self.max_skipped_steps = cfg.train.max_skipped_steps
        self.start = time.monotonic()
        self.consecutive_skipped = 0
        self.counted_steps = 0  # steps of this run that were not absorbed fp16 overflows
        # the ranks agreed to stop for a time limit: SIGUSR1 on some rank and SIGTERM on none, or
        # --exit-duration-in-mins; a SLURM chain requeues such a job (`requeue_marker.py`)
        self.time_limit = False
        # a catcher installed earlier (by `pretrain`, before start-up) keeps what it caught
        self.signals = signals or StopSignals()
        if install_handlers:
            self.signals.install()

    @property
    def received_signal(self) -> int | None:
        return self.signals.received

    def restore_handlers(self) -> None:
        self.signals.restore()

    def __enter__(self) -> "RunControl":
        return self

    def __exit__(self, *exc) -> None:
        self.restore_handlers()

    # -- exit conditions ------------------------------------------------------------------------
    def _local_flags(self, iteration: int) -> list[int]:
        flags = [0, 0, 0]
        # the signal's number: the MAX over ranks is SIGTERM (15) wherever any rank got it, else SIGUSR1 (10)
        flags[_SIGNAL] = int(self.received_signal or 0)
        flags[_INTERVAL] = int(bool(self.exit_interval) and iteration % self.exit_interval == 0)
        if self.exit_duration_in_mins is not None:
            flags[_DURATION] = int((time.monotonic() - self.start) / 60.0 > self.exit_duration_in_mins)
        return flags

    def _reduce_max(self, flags: list[int]) -> list[int]:
        tensor = torch.tensor(flags, dtype=torch.int32, device=self.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    def preempted(self) -> bool:
        """Whether any rank has received a stop signal; the same answer on every rank (a collective).

        Asked once, when start-up is over: from here on SIGTERM no longer ends the process at once
        but is kept for the next step boundary (`stop_signals.py`)."""
        self.signals.end_start_up()
        agreed = self._reduce_max([int(self.received_signal or 0)])[0]
        self.time_limit = agreed == signal.SIGUSR1
        return bool(agreed)

    def should_stop(self, iteration: int) -> StopDecision:
        """Whether to stop after `iteration`, why, and whether to save; the same answer on every rank.

        A collective when torch.distributed is initialised: every rank must call it at every
        iteration.
        """
        flags = self._reduce_max(self._local_flags(iteration))
        if flags[_SIGNAL]:
            name = signal.Signals(flags[_SIGNAL]).name
            if not self.received_signal:
                name = f"{name} on another rank"
            self.time_limit = flags[_SIGNAL] == signal.SIGUSR1
            return StopDecision(True, f"received {name}: saving and exiting at iteration {iteration}", True, True)
        if flags[_INTERVAL]:
            return StopDecision(True, f"exit interval {self.exit_interval} reached at iteration {iteration}", True,
                                False)
        if flags[_DURATION]:
            self.time_limit = True
            return StopDecision(True, f"exit duration of {self.exit_duration_in_mins} minutes reached at "
                                      f"iteration {iteration}", True, False)
        return GO_ON

    # -- skipped steps --------------------------------------------------------------------------
    def record_step(self, skipped: bool, absorbed: bool = False) -> None:
        """`absorbed`: a skipped fp16 overflow the dynamic loss scaler answered by lowering the
        scale; it neither counts nor resets the run of skipped steps."""
        # The engine decides `skipped` from the global loss and gradient norm, so every rank
        # counts the same run and no reduction is needed.
        if skipped and absorbed:
            return
        self.counted_steps += 1
        self.consecutive_skipped = self.consecutive_skipped + 1 if skipped else 0

    def every_step_skipped(self) -> str | None:
        """At the end of a run: a message when every (counted) iteration of it was skipped, so that
        a run too short to reach --max-skipped-steps does not end as a success; None otherwise."""
        if self.max_skipped_steps and self.counted_steps and self.consecutive_skipped == self.counted_steps:
            return (f"every one of the {self.counted_steps} iterations of this run was skipped (inf/NaN loss or "
                    f"gradients): nothing was trained, and no checkpoint was saved")
        return None

    def last_step_skipped(self) -> bool:
        """Whether the newest counted iteration was skipped: the weights are the ones that just gave
        an inf/NaN loss or gradients, not weights to save (always False under --max-skipped-steps 0)."""
        return bool(self.max_skipped_steps) and self.consecutive_skipped > 0

    def ended_inside_skipped_steps(self) -> str | None:
        """At the end of a run: a message when its last iteration was skipped (a run that diverged
        near its end never reaches --max-skipped-steps, and must not end as a success); None otherwise."""
        if not self.last_step_skipped():
            return None
        return self.every_step_skipped() or (
            f"the run ended inside a streak of {self.consecutive_skipped} skipped iterations (inf/NaN loss or "
            f"gradients; --max-skipped-steps is {self.max_skipped_steps}): the model diverged; no checkpoint was "
            "saved")

    def too_many_skipped(self) -> str | None:
        k = self.max_skipped_steps
        if k and self.consecutive_skipped >= k:
            return (f"{self.consecutive_skipped} consecutive iterations were skipped (inf/NaN loss or gradients, or "
                    f"loss spikes); --max-skipped-steps is {k}; no checkpoint was saved")
        return None
