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

N is the number of ranks a parameter is sharded over: the data-parallel size D, or D / R with HSDP
(`optimizer` or `full` with `--data-parallel-replicate-size` R > 1: shard within each of R replica
groups, then all-reduce the gradient shards across the groups). Per parameter, mixed precision keeps 4 bytes of fp32 master weight, 4 of
gradient and 8 of Adam state; `optimizer` and `full` divide those 16 bytes by N. `optimizer`
trades memory for communication: one all-gather per step instead of two (forward and again in
backward), and during gradient accumulation the weights stay gathered across micro-batches.

Mixed precision: weights are cast to `param_dtype` for compute; gradients are reduced in fp32 and
land on fp32 master weights, which the optimizer updates.

Gradient reduction AVERAGES over the data-parallel ranks (FSDP's default): a rank's loss must be
its share of the global loss times the dp size (e.g. its token-sum / global token count x dp) for
the result to equal one process's gradient of the global token-mean loss.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from .mesh import Meshes

SHARDING_MODES = ("none", "optimizer", "full")


def apply_data_parallel(module: nn.Module, meshes: Meshes, sharding: str, param_dtype: torch.dtype | None = None,
                        reduce_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Wrap `module` (a Llama or one pipeline stage of it) in place for data parallelism; returns it.

    Parameter names are unchanged; parameters become DTensors over the data-parallel mesh (sharded
    for `optimizer`/`full`, replicated for `none`). With a data-parallel size of 1 and no mixed
    precision this does nothing.
    """
    if sharding not in SHARDING_MODES:
        raise ValueError(f"data-parallel sharding must be one of {SHARDING_MODES}, not {sharding!r}")
    dp_size = meshes.dp.size()
    if dp_size == 1 and param_dtype in (None, torch.float32):
        return module
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if sharding == "none" or dp_size == 1:
        # FSDP2's own DDP: the same hooks and gradient-sync switches as the sharded modes, and the
        # flattened dp mesh covers HSDP-shaped meshes as one replica group
        def wrap(m: nn.Module, last: bool) -> None:
            replicate(m, mesh=meshes.dp, mp_policy=mp)
    else:
        # a 1-D mesh when there is one replica group: HSDP's all-reduce over 1 rank is pure cost
        mesh = meshes.dp_2d if meshes.dp_2d["dp_replicate"].size() > 1 else meshes.dp_2d["dp_shard"]
        reshard = sharding == "full"

        def wrap(m: nn.Module, last: bool) -> None:
            # the root (and, with `full`, the last layer, whose backward comes first) would be
            # all-gathered again at once: keep them gathered
            fully_shard(m, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard and not last)
    layers = list(module.layers.values())
    for i, layer in enumerate(layers):
        wrap(layer, last=i == len(layers) - 1)
    wrap(module, last=True)
    # ZeRO-2 keeps weights gathered through gradient accumulation, not only forward to backward
    module._dp_keep_gathered = sharding == "optimizer"
    return module


def set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    """Reduce gradients in the coming backward (True), or only accumulate them locally (False).

    For gradient accumulation: disable before every micro-batch but the last. A module without
    data parallelism ignores this.
    """
    if not isinstance(module, FSDPModule):
        return
    module.set_requires_gradient_sync(enabled, recurse=True)
    if getattr(module, "_dp_keep_gathered", False):
        # the weights are resharded after the last micro-batch's backward, before the optimizer
        module.set_reshard_after_backward(enabled, recurse=True)
