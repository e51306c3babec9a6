"""Global gradient-norm clipping over every gradient of the model, however it is laid out.

A gradient may be a plain tensor (replicated: DDP, or one process), or a DTensor sharded over
tensor- and/or data-parallel mesh dimensions (TP, FSDP2). Pipeline stages hold disjoint
parameters. The norm is the L2 norm of the full, unsharded gradient of the whole model, so every
layout computes the same number as one process. The same reductions give the train log the norm of
the parameters and the number of zero gradients (`--log-params-norm`, `--log-num-zeros-in-grad`).
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from ..torch_private import foreach_mul_, foreach_norm


def _local_grads(parameters) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def _materialize_partial(grad: DTensor) -> DTensor:
    # A Partial placement holds summands, whose squares do not add up to the square of the sum.
    if not any(p.is_partial() for p in grad.placements):
        return grad
    return grad.redistribute(placements=[Replicate() if p.is_partial() else p for p in grad.placements])


def _sum_of_squares(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of the squares of every element of `tensors`, an fp32 scalar on `device`."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.device, t.dtype), []).append(t)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for group in by_kind.values():
        total = total + torch.stack(foreach_norm(group)).square().sum().to(device)
    return total


def _count_zeros(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The number of elements of `tensors` equal to zero, an fp64 scalar (exact to 2^53) on `device`."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for t in tensors:
        total = total + (t == 0).sum().to(device, torch.float64)
    return total


def _summed_over_shards(tensors: list[torch.Tensor], device: torch.device, local_sum=_sum_of_squares
                        ) -> torch.Tensor:
    """`local_sum` (a sum over elements) of this pipeline stage's full tensors, identical on all its
    ranks: by default the sum of squares of its full gradients."""
    plain: list[torch.Tensor] = []
    # Local shards of sharded tensors, keyed by (mesh, sharded mesh dims): each key's sum needs one
    # all-reduce per sharded dim. Replicated dims are not reduced, so replicas count once.
    sharded: dict[tuple, list[torch.Tensor]] = {}
    for g in tensors:
        if isinstance(g, DTensor):
            g = _materialize_partial(g)
            # not `is_shard()`: FSDP2 over a tensor-parallel dim uses _StridedShard, which says False
            dims = tuple(i for i, p in enumerate(g.placements) if not p.is_replicate())
            (sharded.setdefault((g.device_mesh, dims), []) if dims else plain).append(g.to_local())
        else:
            plain.append(g)
    total = local_sum(plain, device)
    for (mesh, dims), shards in sharded.items():
        local = local_sum(shards, device)
        for d in dims:
            dist.all_reduce(local, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
        total = total + local
    return total


def _device(grads: list[torch.Tensor], device: Optional[torch.device]) -> torch.device:
    if grads:
        g = grads[0]
        return g.to_local().device if isinstance(g, DTensor) else g.device
    # a rank without gradients still joins the pipeline all-reduce, on the run's device
    return torch.device(device) if device is not None else torch.device("cpu")


def get_grad_norm(parameters: Union[torch.Tensor, Iterable[torch.Tensor]],
                  pp_group: Optional[dist.ProcessGroup] = None,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """The global L2 norm (fp32 scalar tensor) of the gradients of `parameters` across all stages.

    Every rank of the model must call this (it runs collectives on the gradients' meshes and on
    `pp_group`), with its parameters in the same order as the other ranks of its stage. `device`:
    the run's device, where a rank holding no gradients puts its share. Nothing here reads the
    result on the host.
    """
    grads = _local_grads(parameters)
    return _over_stages(_summed_over_shards(grads, _device(grads, device)), pp_group).sqrt()


def get_params_norm(parameters: Iterable[torch.Tensor], pp_group: Optional[dist.ProcessGroup] = None,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """The global L2 norm (fp32 scalar tensor) of the parameters themselves (Megatron-LM's
    --log-params-norm), over every shard and stage: `get_grad_norm`'s collectives, on the weights."""
    params = [p.detach() for p in parameters]
    return _over_stages(_summed_over_shards(params, _device(params, device)), pp_group).sqrt()


def count_zero_grads(parameters: Iterable[torch.Tensor], pp_group: Optional[dist.ProcessGroup] = None,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """The number of gradient elements equal to zero (Megatron-LM's --log-num-zeros-in-grad) over
    every shard and stage, replicas counted once: an fp64 scalar tensor, not read by the host."""
    grads = _local_grads(list(parameters))
    return _over_stages(_summed_over_shards(grads, _device(grads, device), _count_zeros), pp_group)


def _over_stages(total: torch.Tensor, pp_group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    # pipeline stages hold disjoint parameters: their sums add up
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=pp_group)
    return total


def clip_grad_norm_(parameters: Union[torch.Tensor, Iterable[torch.Tensor]], max_norm: float,
                    pp_group: Optional[dist.ProcessGroup] = None,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """Scale all gradients by min(1, max_norm / (norm + 1e-6)); returns the norm before clipping.

    `max_norm` 0 only measures. A non-finite norm (inf/NaN gradients anywhere in the model, on
    every rank alike) leaves the gradients untouched: the caller sees a non-finite norm and skips
    the step. The coefficient stays on the device, so clipping costs no host synchronisation.
    """
    parameters = list(parameters) if not isinstance(parameters, torch.Tensor) else [parameters]
    total_norm = get_grad_norm(parameters, pp_group, device)
    if max_norm <= 0:
        return total_norm
    # torch.nn.utils.clip_grad_norm_'s arithmetic (a coefficient clamped at 1 multiplies every
    # gradient), so one process matches it bit for bit
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    coef = torch.where(torch.isfinite(total_norm), coef, torch.ones_like(coef))
    local = [g.to_local() if isinstance(g, DTensor) else g for g in _local_grads(parameters)]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in local:
        by_device.setdefault(g.device, []).append(g)
    for dev, grads in by_device.items():
        foreach_mul_(grads, coef.to(dev))
    return total_norm
