"""Each rank's own compute time, for the straggler report (`--log-straggler`, `jobs/straggler_report.py`).

A rank's step time says nothing about that rank: a synchronous job waits at its collectives for its
slowest rank, so every rank's step lasts the same. What differs is the time a rank spends in its own
work. This measures the forward of its transformer layers, per layer call:

- Forward pre/post hooks on every layer (`part.layers`) of the built, parallelised model. FSDP2
  (`fully_shard`, and its `replicate`) registers its pre-forward hook with `prepend=True`, and that
  hook waits for the layer's all-gather; ours is registered after, so it runs after that wait, and
  the time measured excludes FSDP's all-gather waits, the pipeline's receives (outside the layers)
  and every data-parallel gradient reduction (in the backward). A tensor-parallel group's ranks still
  wait for each other inside a layer (its all-reduces): a slow rank slows its TP peers' layers too,
  and the report then names the group's ranks together.
- Only the training forward: evaluation (`module.training` False) and recomputation under
  activation checkpointing (which calls the layer's forward, not the module) are not counted.
- On CUDA, a pair of timing events per layer call, recorded on the current stream: the GPU's own
  time between the hooks (the start event is reached only after the stream's wait for the
  all-gather). The host reads nothing per call; the elapsed times are read later, from events of
  finished steps (`collect`, at the report; and every `_FOLD_EVERY` calls, from the events already
  complete, so the pool of events stays bounded). Elsewhere the host clock (`time.perf_counter`),
  which also counts a process stopped by a signal or descheduled by the OS.
- Normalised per layer call, so pipeline stages with different layer counts compare.

The layers are found on the built model from outside (`install`); the model's code knows nothing of it.
"""

from __future__ import annotations

import time

import torch
from torch import nn

# CUDA event pairs kept before the complete ones are folded into the running total
_FOLD_EVERY = 1024


class _HostClock:
    """The host's clock around each call."""

    def __init__(self):
        self.total_ms, self.calls, self._started = 0.0, 0, 0.0

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self) -> None:
        self.total_ms += (time.perf_counter() - self._started) * 1e3
        self.calls += 1

    def collect(self) -> tuple[float, int]:
        taken = self.total_ms, self.calls
        self.total_ms, self.calls = 0.0, 0
        return taken


class _CudaEvents:
    """A pair of timing events on the current stream around each call, read after the fact."""

    def __init__(self):
        self.total_ms, self.calls = 0.0, 0
        self._pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._used = 0  # the pairs recorded since the last fold, in order

    def start(self) -> None:
        # a new pair only when none is free, after freeing those of finished steps
        if self._used == len(self._pairs) and not (self._used >= _FOLD_EVERY and self._fold(wait=False)):
            self._pairs.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
        self._pairs[self._used][0].record()

    def stop(self) -> None:
        self._pairs[self._used][1].record()
        self._used += 1

    def _fold(self, wait: bool) -> int:
        """Adds the complete pairs' times to the total and frees them; how many it freed. `wait`:
        wait for the newest event first (at the report, after the step's own synchronisation: no wait)."""
        if wait and self._used:
            self._pairs[self._used - 1][1].synchronize()
        done = 0
        # in recording order on one stream, so the complete pairs come first
        while done < self._used and self._pairs[done][1].query():
            start, end = self._pairs[done]
            self.total_ms += start.elapsed_time(end)
            done += 1
        self.calls += done
        self._pairs = self._pairs[done:] + self._pairs[:done]  # the free pairs go to the end
        self._used -= done
        return done

    def collect(self) -> tuple[float, int]:
        self._fold(wait=True)
        taken = self.total_ms, self.calls
        self.total_ms, self.calls = 0.0, 0
        return taken


def layers_of(modules: list[nn.Module]) -> list[nn.Module]:
    """The transformer layers of this rank's model parts (a pipeline stage holds some of them)."""
    return [layer for part in modules for layer in getattr(part, "layers", {}).values()]


class LayerForwardTimer:
    """The time this rank's layers spend in their training forward, per call (see the module doc)."""

    def __init__(self, layers: list[nn.Module], device: torch.device):
        self._clock = _CudaEvents() if torch.device(device).type == "cuda" else _HostClock()
        self._handles = []
        for layer in layers:
            # ours after FSDP's pre-hook (prepended: it waits for the all-gather), and before its post-hook
            self._handles.append(layer.register_forward_pre_hook(self._pre))
            self._handles.append(layer.register_forward_hook(self._post, prepend=True))

    # kept out of compiled layers' graphs (`nn.Module.compile` compiles the call with its hooks), as FSDP's are
    @torch.compiler.disable
    def _pre(self, module: nn.Module, args) -> None:
        if module.training:
            self._clock.start()

    @torch.compiler.disable
    def _post(self, module: nn.Module, args, output) -> None:
        if module.training:
            self._clock.stop()

    def collect(self) -> tuple[float, int]:
        """(milliseconds in the layers' forward, layer calls) since the last collect; starts anew."""
        return self._clock.collect()

    def per_call_ms(self) -> float:
        """The mean milliseconds per layer call since the last collect (NaN without a call); starts anew."""
        total, calls = self.collect()
        return total / calls if calls else float("nan")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
