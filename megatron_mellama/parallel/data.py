"""Data parallelism for one model part: DDP, ZeRO-2-like and ZeRO-3 (FSDP2), and HSDP, one code path.

Every mode is PyTorch's FSDP2 machinery: each DecoderLayer is its own unit (one all-gather and
one gradient reduction per layer, overlapped with compute), then the root takes what is left
(embedding, final norm, output layer). Tensor parallel is applied first; FSDP2 composes with
parameters that are already DTensors on the TP mesh.

| `--data-parallel-sharding` | what it does | fp32 weights | grads | Adam state | gathered bf16 weights |
| --- | --- | --- | --- | --- | --- |
| `none` (DDP) | `replicate` over dp, gradients all-reduced | whole | whole | whole | whole |
| `optimizer` (ZeRO-2 like) | `fully_shard`, no reshard after forward | 1/N | 1/N | 1/N | whole, forward to backward |
| `full` (ZeRO-3, FSDP) | `fully_shard`, reshard after forward | 1/N | 1/N | 1/N | one or two layers at a time |

N is the number of ranks a parameter is sharded over: the data-parallel size D (times the
context-parallel size: those ranks hold the same parameters), or D / R with HSDP
(`optimizer` or `full` with `--data-parallel-replicate-size` R > 1: shard within each of R replica
groups, then all-reduce the gradient shards across the groups). Per parameter, mixed precision keeps 4 bytes of fp32 master weight, 4 of
gradient and 8 of Adam state; `optimizer` and `full` divide those 16 bytes by N. `optimizer`
trades memory for communication: one all-gather per step instead of two (forward and again in
backward), and during gradient accumulation the weights stay gathered across micro-batches.

Gradient accumulation (`set_gradient_sync`, and `pipeline_backward_flags` inside a pipeline
schedule): `none` all-reduces once, after the last micro-batch, and keeps the whole gradient
unreduced until then (DDP's no_sync). `optimizer` and `full` reduce-scatter every micro-batch, as
soon as a layer's backward is done, into the fp32 sharded gradient: no full-size gradient outlives
one layer's backward. With HSDP the all-reduce of those shards across the replica groups waits for
the last micro-batch (FSDP2 sums the reduce-scattered shards meanwhile, one shard-sized fp32 buffer).

Mixed precision (`param_dtype`, the engine passes bf16 or fp16): FSDP2 casts the sharded fp32
weights to `param_dtype` before gathering them, so the gathered weights a layer computes with are
bf16 (half the all-gather, no per-micro-batch cast copy); gradients are computed in `param_dtype`,
reduced in `reduce_dtype` (fp32) and land on the fp32 sharded gradients of the fp32 master
weights, which the optimizer updates. Floating-point inputs of every wrapped module are cast to
`param_dtype` (FSDP2's `cast_forward_inputs`), so a pipeline stage's received activations are too.
With a data-parallel size of 1 and a `param_dtype`, the part is wrapped anyway (`replicate` over the
1-rank dp mesh) to get the same bf16 weights.

Gradient reduction AVERAGES over the data-parallel ranks (FSDP's default): a rank's loss must be
its share of the global loss times the dp size (e.g. its token-sum / global token count x dp) for
the result to equal one process's gradient of the global token-mean loss.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from .. import torch_private
from .mesh import Meshes

SHARDING_MODES = ("none", "optimizer", "full")


def apply_data_parallel(module: nn.Module, meshes: Meshes, sharding: str, param_dtype: torch.dtype | None = None,
                        reduce_dtype: torch.dtype = torch.float32, reduce_once_per_step: bool = False) -> nn.Module:
    """Wrap `module` (a Llama or one pipeline stage of it) in place for data parallelism; returns it.

    Parameter names are unchanged; parameters become DTensors over the data-parallel mesh (sharded
    for `optimizer`/`full`, replicated for `none`). With a data-parallel size of 1 and no mixed
    precision this does nothing. `reduce_once_per_step` (`--reduce-grads-once-per-step`): the
    sharded modes too keep whole fp32 gradients through the micro-batches and reduce-scatter once,
    after the last (Megatron-LM's distributed optimizer): 4 bytes per parameter of the part more,
    and 1 / micro-batches of the data-parallel gradient traffic.
    """
    if sharding not in SHARDING_MODES:
        raise ValueError(f"data-parallel sharding must be one of {SHARDING_MODES}, not {sharding!r}")
    # context-parallel ranks hold the same parameters and split the loss: data parallel for gradients
    dp_size = meshes.dp_cp.size()
    if dp_size == 1 and param_dtype in (None, torch.float32):
        return module
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if sharding == "none" or dp_size == 1:
        # FSDP2's own DDP: the same hooks and gradient-sync switches as the sharded modes, and the
        # flattened dp mesh covers HSDP-shaped meshes as one replica group
        replicate = torch_private.replicate()

        def wrap(m: nn.Module, last: bool) -> None:
            replicate(m, mesh=meshes.dp_cp, mp_policy=mp)
    else:
        # a 1-D mesh when there is one replica group: HSDP's all-reduce over 1 rank is pure cost
        mesh = meshes.dp_cp_2d if meshes.dp_cp_2d["dp_replicate"].size() > 1 else meshes.dp_cp_shard
        reshard = sharding == "full"

        def wrap(m: nn.Module, last: bool) -> None:
            # the root (and, with `full`, the last layer, whose backward comes first) would be
            # all-gathered again at once: keep them gathered
            fully_shard(m, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard and not last)
    layers = list(module.layers.values())
    for i, layer in enumerate(layers):
        wrap(layer, last=i == len(layers) - 1)
    wrap(module, last=True)
    sharded = sharding != "none" and dp_size > 1
    # sharded modes reduce-scatter every micro-batch (unless asked not to); DDP reduces once per step
    module._dp_sharded = sharded and not reduce_once_per_step
    # ZeRO-2 keeps weights gathered through gradient accumulation, not only forward to backward
    module._dp_keep_gathered = sharded and sharding == "optimizer"
    return module


def set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    """Gradient accumulation: call before each micro-batch's backward, `enabled` True for the last
    micro-batch of the step and False for the others. A module without data parallelism ignores it.

    `none` (replicate/DDP): a False micro-batch's gradients are only accumulated locally (whole, in
    fp32), and all-reduced with the last one. `optimizer`/`full`: every micro-batch is
    reduce-scattered into the sharded fp32 gradient, whatever `enabled` says; `enabled` decides
    only what waits for the last micro-batch: the all-reduce across HSDP replica groups, and
    (`optimizer`) the reshard of the weights, which stay gathered until the last backward.
    """
    if not isinstance(module, FSDPModule):
        return
    if not reduces_every_micro_batch(module):
        module.set_requires_gradient_sync(enabled, recurse=True)
        if getattr(module, "_dp_keep_gathered", False):
            module.set_reshard_after_backward(enabled, recurse=True)
        return
    module.set_requires_gradient_sync(True, recurse=True)
    # after set_requires_gradient_sync, which sets both; a no-op without replica groups
    module.set_requires_all_reduce(enabled, recurse=True)
    if getattr(module, "_dp_keep_gathered", False):
        # the weights are resharded after the last micro-batch's backward, before the optimizer
        module.set_reshard_after_backward(enabled, recurse=True)


def reduces_every_micro_batch(module: nn.Module) -> bool:
    """Whether `module` is wrapped by `apply_data_parallel` in a sharded mode (`optimizer`/`full`
    over more than one rank): its gradients are reduce-scattered every micro-batch."""
    return isinstance(module, FSDPModule) and getattr(module, "_dp_sharded", False)


def pipeline_backward_flags(module: nn.Module, last: bool) -> None:
    """`set_gradient_sync` inside a torch pipelining schedule, for a module that
    `reduces_every_micro_batch`: call before each backward the schedule runs on the stage.

    As torch's `PipelineStage` does for FSDP modules, the weights stay gathered after a backward
    and FSDP is not finalised until the schedule's end-of-step reduction (`perform_reduce_grad`),
    which reshards; unlike it, gradients are reduce-scattered by FSDP's backward hooks every
    micro-batch. HSDP's all-reduce across replica groups is left to the last micro-batch."""
    module.set_is_last_backward(False)
    module.set_reshard_after_backward(False, recurse=True)
    module.set_requires_gradient_sync(True, recurse=True)
    module.set_requires_all_reduce(last, recurse=True)


def reduce_gradients_now(module: nn.Module) -> None:
    """Reduce-scatter the gradients a backward wrote outside FSDP's autograd hooks (torch
    pipelining's split weight-gradient pass), as FSDP's own post-backward would; for a module
    that `reduces_every_micro_batch`, after `pipeline_backward_flags`. Parameters without a
    gradient are skipped; the weights are not resharded."""
    state = torch_private.fsdp_state(module)
    for each in torch_private.fsdp_states_under(state):
        for group in torch_private.fsdp_param_groups(each):
            group.post_backward()
    # resets the groups' backward state (not the last backward: nothing is finalised), as torch's
    # PipelineStage.perform_reduce_grad does after its own manual post_backward
    torch_private.finish_manual_post_backward(state)
