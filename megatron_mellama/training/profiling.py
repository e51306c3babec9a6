"""Profiling a few iterations (`--profile`) and recording CUDA memory (`--record-memory-history`),
on the `--profile-ranks` ranks, with Megatron-LM's flag names.

`--profile`: a `torch.profiler` trace of iterations --profile-step-start to --profile-step-end
(both included), operator shapes and memory recorded, written by
`torch.profiler.tensorboard_trace_handler` as `rank<R>.<time>.pt.trace.json`: a Chrome trace
(chrome://tracing, Perfetto) that TensorBoard's profiler plugin also reads. Iteration N is marked
`ProfilerStep#N` in the trace, whatever iteration the launch resumed at (torch's own step counter
would number the launch's steps from 0). One trace per launch; the first traced iteration carries
the profiler's start-up.

`--record-memory-history` is CUDA-only (on the CPU one line says it is skipped): every allocation
is recorded with its stack from the start of training, and a snapshot is dumped to
`--memory-snapshot-path` when training ends, out-of-memory errors included (open it at
pytorch.org/memory_viz).

The loop calls `step(iteration)` before each iteration: outside the traced iterations it compares
two integers and nothing else, and it never waits for the device.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..torch_private import dump_memory_snapshot, record_memory_history

MEMORY_HISTORY_ENTRIES = 100_000


def profile_dir(cfg) -> str:
    g = cfg.logging
    if g.profile_dir or g.tensorboard_dir:
        return g.profile_dir or g.tensorboard_dir
    return os.path.join(cfg.checkpoint.save, "profile") if cfg.checkpoint.save else "profile"


def snapshot_path(path: str, rank: int, world: int) -> str:
    """Each rank of a job of several writes its own snapshot: NAME.rankN.EXT."""
    if world <= 1:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}.rank{rank}{ext or '.pickle'}"


def traced_ranks(cfg) -> list[int]:
    return [int(r) for r in cfg.logging.profile_ranks or [0]]


class StepProfiler:
    def __init__(self, cfg, rank: int, device: torch.device):
        g = cfg.logging
        self.start, self.end = g.profile_step_start, g.profile_step_end
        self.enabled = g.profile and rank in traced_ranks(cfg)
        self.directory, self.rank, self.device = profile_dir(cfg), rank, torch.device(device)
        self._profiler = None
        self._marker = None
        self._traced: list[int] = []
        self._done = False

    def step(self, iteration: int) -> None:
        """Iteration `iteration` starts now."""
        if not self.enabled or self._done:
            return
        self._end_marker()
        if self._profiler is None and self.start <= iteration <= self.end:
            self._begin()
        if self._profiler is not None:
            if not self.start <= iteration <= self.end:  # past the end, or rolled back before the start
                self.close()
                return
            self._marker = torch.profiler.record_function(f"ProfilerStep#{iteration}")
            self._marker.__enter__()
            self._traced.append(iteration)

    def _begin(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        os.makedirs(self.directory, exist_ok=True)
        self._profiler = torch.profiler.profile(
            activities=activities, record_shapes=True, profile_memory=True,
            on_trace_ready=torch.profiler.tensorboard_trace_handler(self.directory, worker_name=f"rank{self.rank}"))
        self._profiler.start()

    def _end_marker(self) -> None:
        if self._marker is not None:
            self._marker.__exit__(None, None, None)
            self._marker = None

    def close(self) -> None:
        """Stop tracing and write the trace (at the end of the traced iterations, or of training)."""
        self._end_marker()
        if self._profiler is not None:
            self._profiler.stop()  # calls the trace handler, which writes the file
            self._profiler = None
            self._done = True
            print(f"rank {self.rank}: profile of iterations {self._traced[0]}-{self._traced[-1]} written to "
                  f"{self.directory}", flush=True)


class NoProfiling:
    def step(self, iteration: int) -> None:
        pass


class MemoryHistory:
    """--record-memory-history on a CUDA device: recording from `__enter__`, a snapshot at exit."""

    def __init__(self, cfg, rank: int, world: int, device: torch.device):
        g = cfg.logging
        self.path = snapshot_path(g.memory_snapshot_path, rank, world)
        wanted = g.record_memory_history and rank in traced_ranks(cfg)
        self.enabled = wanted and torch.device(device).type == "cuda"
        if wanted and not self.enabled:
            print(f"rank {rank}: --record-memory-history records CUDA allocations only: skipped on "
                  f"{torch.device(device).type}", flush=True)

    def __enter__(self):
        if self.enabled:
            # torch's documented memory-snapshot API (torch.cuda.memory, "Understanding CUDA Memory Usage")
            record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        return self

    def __exit__(self, kind, error, trace) -> None:
        if not self.enabled:
            return
        why = "an out-of-memory error" if isinstance(error, torch.OutOfMemoryError) else "the end of training"
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        dump_memory_snapshot(self.path)
        record_memory_history(enabled=None)
        print(f"memory snapshot at {why} written to {self.path}", flush=True)


@contextlib.contextmanager
def profiling(cfg, rank: int, world: int, device: torch.device):
    """The loop's profiler (`step(iteration)` before each iteration) for the duration of training."""
    profiler = StepProfiler(cfg, rank, device)
    with MemoryHistory(cfg, rank, world, device):
        try:
            yield profiler
        finally:
            profiler.close()
