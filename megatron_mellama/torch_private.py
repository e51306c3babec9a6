"""Every private torch name the package relies on, in one place, each read through an accessor.

torch's underscore names change between releases without notice. The package supports
torch >= 2.10, < 3; every private module, class attribute or function it uses is listed in
`PRIVATE` with the spellings those releases have (the first that resolves wins), and code elsewhere
reaches it only through the accessors below. A name no installed spelling resolves raises one line
naming it and the torch version, where it is first used, not as an AttributeError deep in a step.
`tests/test_torch_private.py` resolves the whole registry on the installed torch.

This module imports nothing of the package, so every layer may use it.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import torch

from .errors import MellamaError

SUPPORTED = "torch>=2.10,<3"


class PrivateTorchError(MellamaError, RuntimeError):
    """A private torch name the package needs is not in the installed torch."""


@dataclass(frozen=True)
class Private:
    """A private name: `module`, then one attribute path of `spellings` on it ("" is the module
    itself); the first spelling that resolves is used."""

    module: str
    spellings: tuple[str, ...] = ("",)
    why: str = ""


PRIVATE: dict[str, Private] = {
    # FSDP2 internals (torch.distributed.fsdp._fully_shard): the split weight-gradient pass reduces
    # by hand, and the dry run labels the gradients FSDP accumulates
    "FSDPModule._get_fsdp_state": Private("torch.distributed.fsdp", ("FSDPModule._get_fsdp_state",),
                                          "an FSDP unit's state, where fully_shard.state is absent"),
    "FSDPState._fsdp_param_groups": Private(
        "torch.distributed.fsdp._fully_shard._fsdp_state", ("FSDPState",),
        "a unit's parameter groups: a list `_fsdp_param_groups` from 2.13, one `_fsdp_param_group` before"),
    "FSDPState._state_ctx.all_states": Private("torch.distributed.fsdp._fully_shard._fsdp_state",
                                               ("FSDPStateContext",), "the states under a root"),
    "FSDPState._root_post_backward_final_callback": Private(
        "torch.distributed.fsdp._fully_shard._fsdp_state", ("FSDPState._root_post_backward_final_callback",),
        "resets backward state after a manual post_backward"),
    "FSDPParamGroup.post_backward": Private("torch.distributed.fsdp._fully_shard._fsdp_param_group",
                                            ("FSDPParamGroup.post_backward",), "reduce-scatter now"),
    "replicate_with_fsdp.replicate": Private("torch.distributed._composable.replicate_with_fsdp", ("replicate",),
                                             "FSDP2's DDP (the `none` sharding mode)"),
    # pipelining's split backward (zero-bubble)
    "pipelining._backward.stage_backward": Private("torch.distributed.pipelining._backward", ("stage_backward",)),
    "pipelining._backward.stage_backward_input": Private("torch.distributed.pipelining._backward",
                                                         ("stage_backward_input",)),
    "pipelining._backward.stage_backward_weight": Private("torch.distributed.pipelining._backward",
                                                          ("stage_backward_weight",)),
    # collectives
    "_functional_collectives": Private("torch.distributed._functional_collectives"),
    "_functional_collectives.AsyncCollectiveTensor": Private("torch.distributed._functional_collectives",
                                                             ("AsyncCollectiveTensor",)),
    "_functional_collectives.all_gather_autograd": Private(
        "torch.distributed._functional_collectives", ("all_gather_single_autograd", "all_gather_tensor_autograd"),
        "an all-gather with a reduce-scatter backward (renamed in 2.13)"),
    "torch.ops._c10d_functional": Private("torch", ("ops._c10d_functional",),
                                          "the functional collectives' ops, which selective recompute keeps"),
    "DeviceMesh._flatten": Private("torch.distributed.device_mesh", ("DeviceMesh._flatten",)),
    # hangs (`parallel/timeouts.py`): a group's timeout changed after creation, the groups of this
    # process, and the flight recorder's dump (NCCL's where built with NCCL, else the generic one gloo uses)
    "_set_pg_timeout": Private("torch.distributed.distributed_c10d", ("_set_pg_timeout",)),
    "_world.pg_map": Private("torch.distributed.distributed_c10d", ("_world.pg_map",)),
    "flight_recorder_dump": Private("torch._C._distributed_c10d", ("_dump_nccl_trace", "_dump_fr_trace"),
                                    "the flight recorder's entries, a pickle"),
    "DeviceMesh._unflatten": Private("torch.distributed.device_mesh", ("DeviceMesh._unflatten",)),
    # --record-memory-history (`training/profiling.py`): the allocator's history and its snapshot,
    # documented ("Understanding CUDA Memory Usage") but underscored since torch 2.1
    "cuda.memory._record_memory_history": Private("torch.cuda.memory", ("_record_memory_history",)),
    "cuda.memory._dump_snapshot": Private("torch.cuda.memory", ("_dump_snapshot",)),
    # the dry run: a fake world, fake tensors, torch's memory tracker
    "fake_pg.FakeStore": Private("torch.testing._internal.distributed.fake_pg", ("FakeStore",)),
    "FakeTensorMode": Private("torch._subclasses.fake_tensor", ("FakeTensorMode",)),
    "unset_fake_temporarily": Private("torch._subclasses.fake_tensor", ("unset_fake_temporarily",)),
    "_disable_current_modes": Private("torch.utils._python_dispatch", ("_disable_current_modes",)),
    "_get_current_dispatch_mode": Private("torch.utils._python_dispatch", ("_get_current_dispatch_mode",)),
    "_pop_mode_temporarily": Private("torch.utils._python_dispatch", ("_pop_mode_temporarily",),
                                     "selective recompute steps outside its dispatch mode for kept calls"),
    "CausalBias._dispatch": Private("torch.nn.attention.bias", ("CausalBias._dispatch",),
                                    "how SDPA runs a causal bias (the dry run overrides it)"),
    "mem_tracker.MemTracker": Private("torch.distributed._tools.mem_tracker", ("MemTracker",)),
    "mem_tracker._TOTAL_KEY": Private("torch.distributed._tools.mem_tracker", ("_TOTAL_KEY",)),
    "mem_tracker._MemRefType": Private("torch.distributed._tools.mem_tracker", ("_MemRefType",)),
    "ShardingPropagator._propagate_tensor_meta_non_cached": Private(
        "torch.distributed.tensor._sharding_prop", ("ShardingPropagator._propagate_tensor_meta_non_cached",),
        "DTensor's shape inference, which the memory tracer does not count"),
    "_pytree.tree_flatten": Private("torch.utils._pytree", ("tree_flatten",)),
    # optimizer-step arithmetic
    "torch._foreach_mul_": Private("torch", ("_foreach_mul_",)),
    "torch._foreach_norm": Private("torch", ("_foreach_norm",), "gradient clipping's norms in a few kernels"),
    # a tensor's in-place write counter: converted rope tables are reused until their source changes
    "Tensor._version": Private("torch", ("Tensor._version",)),
    # checkpoint reading: where a torch.save'd tensor's bytes start
    "UntypedStorage._checkpoint_offset": Private("torch", ("UntypedStorage._checkpoint_offset",)),
    # selective recompute: compiled regions made visible to the checkpoint policy
    "inductor_compiled_code": Private("torch._higher_order_ops.wrap", ("inductor_compiled_code",)),
}

# members of torch's MemTracker that `training/memory_trace.StepTracer` reads or overrides; the
# instance attributes are checked on a constructed tracer
MEM_TRACKER_METHODS = ("_update_peak_stats", "_pre_fw_hook", "_post_fw_hook", "_pre_bw_hook", "_post_bw_hook",
                       "_track_module_params_and_buffers", "_update_and_maybe_create_winfos", "track_external")
MEM_TRACKER_STATE = ("_curr_mem_snap", "_peak_mem", "_peak_mem_snap", "_mod_tracker", "_ac_mod", "_in_ac", "_WINFO",
                     "memory_tracking")


def missing(name: str) -> PrivateTorchError:
    return PrivateTorchError(f"torch {torch.__version__} has no {name}, which megatron_mellama needs "
                             f"(supported: {SUPPORTED})")


def _walk(obj, path: str):
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part)
    return obj


@functools.cache
def resolve(name: str):
    """The object `PRIVATE[name]` names in the installed torch; `PrivateTorchError` if none of its
    spellings exists."""
    entry = PRIVATE[name]
    try:
        module = importlib.import_module(entry.module)
    except ImportError:
        raise missing(f"module {entry.module} ({name})") from None
    for spelling in entry.spellings:
        try:
            return _walk(module, spelling)
        except AttributeError:
            continue
    raise missing(name)


def optional(name: str):
    """`resolve(name)`, or None where the installed torch lacks it (a feature the caller can do without)."""
    try:
        return resolve(name)
    except PrivateTorchError:
        return None


def unresolved() -> list[str]:
    """The registry's names the installed torch lacks."""
    out = []
    for name in PRIVATE:
        try:
            resolve(name)
        except PrivateTorchError:
            out.append(name)
    return out


def require_members(obj, names, what: str) -> None:
    """One line naming the first of `names` that `obj` (a torch object the package subclasses or
    reads into) lacks."""
    for n in names:
        if not hasattr(obj, n):
            raise missing(f"{what}.{n}")


# -- FSDP2 --------------------------------------------------------------------------------------------
def fsdp_state(module):
    """The FSDP state of an FSDP unit (a `fully_shard`ed or FSDP2-`replicate`d module)."""
    get = getattr(module, "_get_fsdp_state", None)
    if get is not None:
        return get()
    from torch.distributed.fsdp import fully_shard

    if not hasattr(fully_shard, "state"):
        raise missing("FSDPModule._get_fsdp_state")
    return fully_shard.state(module)


def fsdp_param_groups(state) -> list:
    """A unit's parameter groups: torch 2.13 keeps a list (`_fsdp_param_groups`), earlier releases
    one group or None (`_fsdp_param_group`)."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    if not hasattr(state, "_fsdp_param_group"):
        raise missing("FSDPState._fsdp_param_groups (or _fsdp_param_group)")
    group = state._fsdp_param_group
    return [group] if group is not None else []


def fsdp_states_under(root_state) -> list:
    """Every FSDP state the root `root_state` runs (itself and its sub-units)."""
    ctx = getattr(root_state, "_state_ctx", None)
    if ctx is None or not hasattr(ctx, "all_states"):
        raise missing("FSDPState._state_ctx.all_states")
    return list(ctx.all_states)


def finish_manual_post_backward(root_state) -> None:
    """Reset the backward state of `root_state`'s units after post_backward was called by hand."""
    callback = getattr(root_state, "_root_post_backward_final_callback", None)
    if callback is None:
        raise missing("FSDPState._root_post_backward_final_callback")
    callback()


def replicate():
    """FSDP2's `replicate` (DDP on FSDP2's hooks)."""
    return resolve("replicate_with_fsdp.replicate")


# -- pipelining, collectives, meshes ------------------------------------------------------------------
def stage_backward_functions():
    """(stage_backward, stage_backward_input, stage_backward_weight) of torch pipelining."""
    return (resolve("pipelining._backward.stage_backward"), resolve("pipelining._backward.stage_backward_input"),
            resolve("pipelining._backward.stage_backward_weight"))


def functional_collectives():
    return resolve("_functional_collectives")


def async_collective_tensor_type():
    return resolve("_functional_collectives.AsyncCollectiveTensor")


def all_gather_autograd():
    """An all-gather along a dimension whose backward is a reduce-scatter."""
    return resolve("_functional_collectives.all_gather_autograd")


def c10d_functional_ops():
    return resolve("torch.ops._c10d_functional")


def flatten_mesh(mesh, name: str):
    resolve("DeviceMesh._flatten")
    return mesh._flatten(name)


def unflatten_mesh(mesh, dim: int, sizes, names):
    resolve("DeviceMesh._unflatten")
    return mesh._unflatten(dim, sizes, names)


# -- tensors, modes, tracing --------------------------------------------------------------------------
def foreach_mul_(tensors: list[torch.Tensor], factor) -> None:
    """Multiply `tensors` in place by `factor` (a number or a one-element tensor on their device),
    one fused launch where torch has it."""
    fused = optional("torch._foreach_mul_")
    if fused is not None:
        fused(tensors, factor)
        return
    for t in tensors:
        t.mul_(factor)


def foreach_norm(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The fp32 L2 norm of each of `tensors` (one device, one dtype): a few multi-tensor kernels
    where torch has them, else one reduction per tensor. Read at each call, not cached."""
    fused = getattr(torch, "_foreach_norm", None)
    if fused is not None:
        try:
            return list(fused(tensors, 2, dtype=torch.float32))
        except (TypeError, NotImplementedError):
            pass  # a build without the dtype argument, or without a kernel for this device
    return [torch.linalg.vector_norm(t, 2, dtype=torch.float32) for t in tensors]


def tensor_version(t: torch.Tensor) -> int:
    """How many in-place writes `t` has had (autograd's counter)."""
    return t._version


def record_memory_history(**kwargs) -> None:
    resolve("cuda.memory._record_memory_history")(**kwargs)


def dump_memory_snapshot(path: str) -> None:
    resolve("cuda.memory._dump_snapshot")(path)


def fake_tensor_mode():
    return resolve("FakeTensorMode")


def unset_fake_temporarily():
    return resolve("unset_fake_temporarily")()


def fake_store():
    return resolve("fake_pg.FakeStore")()


def disable_current_modes():
    return resolve("_disable_current_modes")()


def current_dispatch_mode():
    """The innermost user dispatch mode (TorchDispatchMode) in effect, or None."""
    return resolve("_get_current_dispatch_mode")()


def pop_mode_temporarily():
    """Context manager: the innermost dispatch mode is off inside it (and yielded)."""
    return resolve("_pop_mode_temporarily")()


def mem_tracker_parts():
    """(MemTracker, its total-memory key, its memory-kind enum)."""
    tracker = resolve("mem_tracker.MemTracker")
    require_members(tracker, MEM_TRACKER_METHODS, "MemTracker")
    return tracker, resolve("mem_tracker._TOTAL_KEY"), resolve("mem_tracker._MemRefType")


def sharding_propagator_shape_inference():
    """(ShardingPropagator, the name of its uncached shape-inference method)."""
    resolve("ShardingPropagator._propagate_tensor_meta_non_cached")
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    return ShardingPropagator, "_propagate_tensor_meta_non_cached"


def tree_flatten(tree):
    return resolve("_pytree.tree_flatten")(tree)


def storage_checkpoint_offset(storage):
    """Where a tensor loaded to meta by `torch.load` starts in its file, or None."""
    return getattr(storage, "_checkpoint_offset", None)


def inductor_compiled_code_op():
    """The higher-order op that compiled regions run as when inductor's
    `wrap_inductor_compiled_regions` is on (what a checkpoint policy sees of them); None if absent."""
    return optional("inductor_compiled_code")
