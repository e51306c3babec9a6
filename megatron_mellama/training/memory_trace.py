"""What one training step holds in memory, by kind, and what it sends, by collective.

`StepTracer` is torch's `MemTracker` (torch.distributed._tools.mem_tracker) cut down to what a
step needs: the peak of live tensor storage and its make-up at that moment (parameters,
gradients, optimizer state, activations saved for backward, temporaries of backward), counted
from every storage created or resized, with or without real memory behind it (it works under
`FakeTensorMode`). On top it counts the bytes every collective moves.

Three departures from `MemTracker`, each needed for a training step:
- a module may run several times per step (gradient accumulation, pipeline micro-batches):
  `MemTracker` refuses a second forward of the root module;
- it keeps no per-module snapshots (a 70B stage runs thousands of module calls per step, and
  `MemTracker` copies a snapshot at each);
- the global-shape tensors that DTensor's sharding propagation builds to infer output shapes
  are not counted: under `FakeTensorMode` they are created in the tracer's own fake mode and
  would count as if a rank held the whole unsharded tensor.
"""

from __future__ import annotations

import collections
import functools
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .. import torch_private
from ..torch_private import tree_flatten

MemTracker, _TOTAL_KEY, _MemRefType = torch_private.mem_tracker_parts()

GIB = 2 ** 30
# how the tracker's categories are reported
KINDS = ("weights", "gathered", "gradients", "optimizer", "activations", "temporaries")


@dataclass
class MemoryPeak:
    """Bytes live at the step's peak, by kind; `gathered` is parameter memory beyond the rank's
    own master weights (the compute copies data parallelism gathers)."""

    total: int
    by_kind: dict[str, int]
    communication: dict[str, dict] = field(default_factory=dict)  # collective -> {calls, bytes}

    def gib(self) -> dict[str, float]:
        return {k: v / GIB for k, v in self.by_kind.items()} | {"total": self.total / GIB}


class StepTracer(MemTracker):
    """`with StepTracer(modules, optimizer) as t: <one step>`; then `t.peak()`."""

    def __init__(self, modules, optimizer=None, group_names: dict[str, str] | None = None):
        """`group_names`: process-group name -> what to call its collectives (e.g. "tp")."""
        super().__init__()
        torch_private.require_members(self, torch_private.MEM_TRACKER_STATE, "MemTracker")
        self._group_names = group_names or {}
        self._paused = 0
        self._comm = collections.defaultdict(lambda: dict(calls=0, bytes=0))
        self._marks: list[dict] = []
        self.track_external(*modules, *([optimizer] if optimizer is not None else []))
        # what the rank owns before the step: its master weights (sharded where DP shards them)
        self._master = sum(v[_MemRefType.PARAM] for v in self._curr_mem_snap.values())

    # -- the step's peak, not per-module snapshots --------------------------------------------------
    def _update_peak_stats(self, peak_state) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                self._peak_mem[dev] = snap[_TOTAL_KEY]
                self._peak_mem_snap[dev] = dict(snap)

    def _pre_fw_hook(self, module, inputs) -> None:
        if module not in self.memory_tracking:
            self._track_module_params_and_buffers(module, install_grad_hooks=True)
            self.memory_tracking[module] = True
        elif self._mod_tracker.is_bw and self._ac_mod is None:
            # a forward during backward: activation recomputation; what it makes is activation
            self._ac_mod = weakref.ref(module)
            self._in_ac = True

    def _post_fw_hook(self, module, inputs, outputs) -> None:
        if self._mod_tracker.is_bw and self._ac_mod is not None and self._ac_mod() is module:
            self._ac_mod = None
            self._in_ac = False

    def _pre_bw_hook(self, module, args) -> None:
        pass

    def _post_bw_hook(self, module, args) -> None:
        pass

    # -- DTensor's shape inference is not memory ------------------------------------------------------
    def __enter__(self):
        propagator, method = torch_private.sharding_propagator_shape_inference()
        original = getattr(propagator, method)
        tracer = self

        @functools.wraps(original)
        def untracked(propagator, *args, **kwargs):
            tracer._paused += 1
            try:
                return original(propagator, *args, **kwargs)
            finally:
                tracer._paused -= 1

        self._original_propagation = (propagator, method, original)
        setattr(propagator, method, untracked)
        return super().__enter__()

    def __exit__(self, *args):
        setattr(*self._original_propagation)
        return super().__exit__(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._paused:
            return func(*args, **(kwargs or {}))
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if out is not NotImplemented and func.namespace in ("c10d", "_c10d_functional"):
            self._count_collective(func, args, kwargs, out)
        return out

    def _count_collective(self, func, args, kwargs, out) -> None:
        name = _COLLECTIVES.get(func.__name__.split(".")[0])
        if name is None:
            return
        leaves = tree_flatten((args, kwargs))[0]
        tensors = [t for t in leaves + tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not tensors:
            return
        group = next((self._group_names[g] for g in map(_group_name, leaves) if g in self._group_names), None)
        name = f"{name} {group}" if group else name
        # the collective's full buffer: the gathered output, the scattered input, the reduced tensor
        self.count(name, max(t.numel() * t.element_size() for t in tensors))

    def count(self, name: str, size: int) -> None:
        entry = self._comm[name]
        entry["calls"] += 1
        entry["bytes"] += size

    def label_gradients(self, tensors) -> None:
        """Count `tensors` as gradients from now on (e.g. the unsharded gradients DDP accumulates
        between micro-batches, which are not any parameter's `.grad` yet)."""
        for t in tensors:
            t = t.to_local() if isinstance(t, DTensor) else t
            if t is not None and t.untyped_storage() in self._WINFO:
                self._update_and_maybe_create_winfos(t, _MemRefType.GRAD)

    def mark(self) -> None:
        """A micro-batch starts: lets `communication(n)` tell one steady-state micro-batch's share."""
        self._marks.append({k: dict(v) for k, v in self._comm.items()})

    def communication(self, micro_batches: int | None = None) -> dict[str, dict]:
        """Calls and bytes per collective over the step; with `micro_batches` larger than the marks
        traced, the micro-batches not traced are counted as the middle traced one."""
        total = {k: dict(v) for k, v in self._comm.items()}
        traced = len(self._marks)
        if micro_batches is None or micro_batches <= traced or traced < 3:
            return total
        # the middle interval: after warm-up, before the last micro-batch's gradient reduction
        i = traced // 2
        before, after = self._marks[i], self._marks[i + 1]
        for name, entry in total.items():
            for key in ("calls", "bytes"):
                steady = after.get(name, {}).get(key, 0) - before.get(name, {}).get(key, 0)
                entry[key] += (micro_batches - traced) * steady
        return total

    # -- results ------------------------------------------------------------------------------------
    def peak(self, micro_batches: int | None = None) -> MemoryPeak:
        snap = collections.Counter()
        for dev_snap in self._peak_mem_snap.values():
            snap.update(dev_snap)
        params = snap[_MemRefType.PARAM]
        by_kind = dict(weights=min(params, self._master), gathered=max(params - self._master, 0),
                       gradients=snap[_MemRefType.GRAD], optimizer=snap[_MemRefType.OPT],
                       activations=snap[_MemRefType.ACT],
                       temporaries=snap[_MemRefType.TEMP] + snap[_MemRefType.BUFFER] + snap[_MemRefType.OTH])
        return MemoryPeak(total=snap[_TOTAL_KEY], by_kind=by_kind, communication=self.communication(micro_batches))


# c10d's and the functional collectives' names -> one name per kind of collective
_COLLECTIVES = {"allreduce_": "all-reduce", "all_reduce": "all-reduce", "all_reduce_coalesced": "all-reduce",
                "allreduce_coalesced_": "all-reduce", "_allgather_base_": "all-gather",
                "all_gather_into_tensor": "all-gather", "all_gather_into_tensor_coalesced": "all-gather",
                "allgather_": "all-gather", "allgather_into_tensor_coalesced_": "all-gather",
                "_reduce_scatter_base_": "reduce-scatter", "reduce_scatter_tensor": "reduce-scatter",
                "reduce_scatter_tensor_coalesced": "reduce-scatter", "reduce_scatter_": "reduce-scatter",
                "reduce_scatter_tensor_coalesced_": "reduce-scatter", "broadcast_": "broadcast",
                "broadcast": "broadcast", "all_to_all_single": "all-to-all", "alltoall_base_": "all-to-all",
                "send": "send", "recv_": "recv"}


def _group_name(arg) -> str | None:
    if isinstance(arg, str):  # functional collectives name their group
        return arg
    if isinstance(arg, torch.ScriptObject):  # c10d's take the ProcessGroup, boxed
        try:
            return dist.ProcessGroup.unbox(arg).group_name
        except (RuntimeError, AttributeError):
            return None
    return None


__all__ = ["StepTracer", "MemoryPeak", "KINDS", "GIB"]
