"""Timers of a training iteration's phases, Megatron-LM's `--timing-log-level` and `--timing-log-option`.

Level 0 (the default) times nothing beyond the train log's time per iteration. Level 1 times the
phases that run once per iteration or less:

    data-wait          the next global batch from the loader (this rank's micro-batches)
    forward-backward   forward and backward over the micro-batches, pipeline schedule included; a
                       data-parallel gradient reduction runs inside the backward (FSDP2 and DDP
                       overlap it with the backward), so it has no timer of its own
    optimizer          AdamW's and the learning-rate scheduler's step, gradients zeroed
    save-checkpoint    a checkpoint save (its host part when --async-save)
    evaluation         validation and downstream scoring

Level 2 adds `grads-clip`: unscaling, the gradient norm with its all-reduces, clipping (and the
zero count of --log-num-zeros-in-grad), the reduction that is separable from the backward.

The host clock times the phases the host waits for (data, saving, evaluation, which read their
results). On a GPU the phases whose work is queued without waiting (forward-backward, grads-clip,
optimizer) are timed by CUDA events recorded around them, so timing adds no host synchronisation
per step or micro-batch: the events are read at the train log, after one synchronisation with the
last of them. Each time is the window's (the iterations since the last train log) divided by its
iterations, as Megatron-LM normalises by the log interval.

At the train log every rank's times come together in one small collective on the run's device:
`max` (an all-reduce MAX), `minmax` (one all-reduce MAX of the times and their negatives) or `all`
(an all-gather). Rank 0 prints them in ms, writes `<name>-time` (seconds, the maximum over ranks)
to TensorBoard and W&B, and `timers` ({name: {"max", "min" or "ranks"}}, seconds) to the JSON log.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist

LEVELS = {"data-wait": 1, "forward-backward": 1, "grads-clip": 2, "optimizer": 1, "save-checkpoint": 1,
          "evaluation": 1}
# work the host queues on the GPU without waiting for it: timed by CUDA events there
QUEUED = {"forward-backward", "grads-clip", "optimizer"}
OPTIONS = ("max", "minmax", "all")
NAME_WIDTH = 48  # Megatron-LM's dotted column


class Timers:
    def __init__(self, level: int, option: str, device):
        self.level, self.option, self.device = level, option, torch.device(device)
        self.names = [name for name, at in LEVELS.items() if at <= level]
        self._events = self.device.type == "cuda"
        self._host = dict.fromkeys(self.names, 0.0)
        self._pairs: dict[str, list] = {name: [] for name in self.names}

    @classmethod
    def from_config(cls, cfg, device) -> "Timers":
        return cls(cfg.logging.timing_log_level, cfg.logging.timing_log_option, device)

    def __call__(self, name: str):
        """A context timing phase `name`; nothing at all when the level leaves it out."""
        if name not in self._host:
            return contextlib.nullcontext()
        return self._timed(name)

    @contextlib.contextmanager
    def _timed(self, name: str):
        if self._events and name in QUEUED:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                stop = torch.cuda.Event(enable_timing=True)
                stop.record()
                self._pairs[name].append((start, stop))
            return
        began = time.perf_counter()
        try:
            yield
        finally:
            self._host[name] += time.perf_counter() - began

    def _window_seconds(self) -> list[float]:
        """This rank's time in each phase since the last call, which starts a new window."""
        pending = [pair for pairs in self._pairs.values() for pair in pairs]
        if pending:
            pending[-1][1].synchronize()  # the last event recorded: every earlier one is done too
        seconds = []
        for name in self.names:
            queued = sum(start.elapsed_time(stop) for start, stop in self._pairs[name]) / 1000.0
            seconds.append(self._host[name] + queued)
            self._host[name], self._pairs[name] = 0.0, []
        return seconds

    def report(self, steps: int):
        """The window's times over every rank (a collective: every rank calls it at the train log),
        per iteration of the `steps` since the last log: (JSON record, console text, TensorBoard
        scalars), or None at level 0."""
        if not self.names:
            return None
        mine = torch.tensor(self._window_seconds(), dtype=torch.float64, device=self.device) / max(steps, 1)
        n = len(self.names)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if self.option == "all":
            ranks = [torch.empty_like(mine) for _ in range(world)]
            if world > 1:
                dist.all_gather(ranks, mine)
            else:
                ranks = [mine]
            per_rank = torch.stack(ranks).t().tolist()  # [timer][rank]
            record = {name: {"ranks": times} for name, times in zip(self.names, per_rank)}
        else:
            both = torch.cat([mine, -mine])
            if world > 1:
                dist.all_reduce(both, op=dist.ReduceOp.MAX)
            values = both.tolist()
            record = {name: {"max": values[i]} for i, name in enumerate(self.names)}
            if self.option == "minmax":
                for i, name in enumerate(self.names):
                    record[name]["min"] = -values[n + i]
        return record, timers_line(record, self.option), report_scalars(record)


def report_scalars(record: dict) -> dict[str, float]:
    """TensorBoard's view of a timers record: `<name>-time`, the slowest rank's seconds."""
    return {f"{name}-time": max(times["ranks"]) if "ranks" in times else times["max"]
            for name, times in record.items()}


def timers_line(record: dict, option: str) -> str:
    heading = {"max": "max time across ranks (ms):", "minmax": "(min, max) time across ranks (ms):",
               "all": "times across ranks (ms):"}[option]
    lines = [heading]
    for name, times in record.items():
        label = (name + " ").ljust(NAME_WIDTH, ".")
        if "ranks" in times:
            value = ", ".join(f"{t * 1000:.2f}" for t in times["ranks"])
        elif "min" in times:
            value = f"({times['min'] * 1000:.2f}, {times['max'] * 1000:.2f})"
        else:
            value = f"{times['max'] * 1000:.2f}"
        lines.append(f"    {label}: {value}")
    return "\n".join(lines)
