"""Pipeline parallelism: split the single-device model into stages and run a torch pipelining schedule.

Each stage is the whole `Llama` with the parts it does not own removed, so every parameter it keeps
has its full-model name (`layers.17.mlp.up_proj.weight`) and checkpoints do not depend on the
layout. Layers are split evenly and contiguously over `pp * v` stages (v stages per rank).

Stages are placed in a loop: rank r owns stages r, r + pp, r + 2pp, ... (one stage per rank for
``1f1b``, v for ``interleaved-1f1b`` and ``zero-bubble``).

``zero-bubble`` is torch's `ScheduleInterleavedZeroBubble` (ZB1P: the backward split into input and
weight gradients, the weight half filling the bubble), not the V-shaped `ScheduleZBVZeroBubble`.
ZB-V would put two adjacent stages on one rank, and in torch 2.13 `schedule.eval()` then fails (it
still hands input gradients between those stages), so validation could not run through it; ZB-V
also accepts exactly two stages per rank, while ZB1P takes any number, with the same placement and
the same `--num-layers-per-virtual-pipeline-stage` meaning as interleaved 1F1B.

Data parallelism inside the schedule: torch's `PipelineStage` turns off FSDP's gradient sync for
every micro-batch and reduces once, at the end of the step. Stages here (`_Stage`) keep that for
`none` (replicate/DDP) only; a sharded stage (`optimizer`/`full`) reduce-scatters each
micro-batch's gradients as FSDP's hooks see them, and after each split weight-gradient pass of
``zero-bubble`` (see `parallel/data.py`), so no full-size gradient lives across micro-batches.

With bf16 (or fp16) compute the tensors sent between stages (activations forward, their
gradients backward) are in that dtype: the data-parallel wrapper makes the weights, and so the
residual stream, bf16 (`parallel/data.py`).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B,
                                          ScheduleInterleavedZeroBubble)

from .. import torch_private
from ..model.llama import Llama
from .data import pipeline_backward_flags, reduce_gradients_now, reduces_every_micro_batch

stage_backward, stage_backward_input, stage_backward_weight = torch_private.stage_backward_functions()

_SCHEDULES = {"1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B,
              "zero-bubble": ScheduleInterleavedZeroBubble}


def stages_per_rank(num_layers: int, pp_size: int, num_layers_per_virtual_stage: int | None, schedule: str) -> int:
    """v: how many (virtual) stages each PP rank runs."""
    if schedule not in _SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose from {', '.join(_SCHEDULES)}")
    per_stage = num_layers_per_virtual_stage or max(num_layers // pp_size, 1)
    if num_layers % (pp_size * per_stage):
        raise ValueError(f"{num_layers} layers do not split evenly into {pp_size} pipeline ranks"
                         + (f" x {per_stage} layers per virtual stage" if num_layers_per_virtual_stage else ""))
    v = num_layers // (pp_size * per_stage)
    if schedule == "1f1b" and v != 1:
        raise ValueError(f"the 1f1b schedule runs one stage per rank, not {v}; use interleaved-1f1b")
    return v


def stage_indices(pp_rank: int, pp_size: int, v: int) -> list[int]:
    """The stages rank `pp_rank` owns, in the loop placement all three schedules expect."""
    return [pp_rank + k * pp_size for k in range(v)]


def split_into_stages(model: Llama, pp_rank: int, pp_size: int, num_layers_per_virtual_stage: int | None,
                      schedule: str) -> list[tuple[int, Llama]]:
    """The (stage index, module) parts this PP rank owns; each keeps the full model's parameter names."""
    num_layers = len(model.layers)
    v = stages_per_rank(num_layers, pp_size, num_layers_per_virtual_stage, schedule)
    num_stages = pp_size * v
    per_stage = num_layers // num_stages
    parts = []
    for stage in stage_indices(pp_rank, pp_size, v):
        part = copy.deepcopy(model)
        keep = {str(i) for i in range(stage * per_stage, (stage + 1) * per_stage)}
        for name in [n for n in part.layers if n not in keep]:
            del part.layers[name]
        if stage != 0:
            part.embed_tokens = None
        if stage != num_stages - 1:
            part.norm = None
            part.lm_head = None
        parts.append((stage, part))
    return parts


def has_first_stage(parts: list[tuple[int, nn.Module]]) -> bool:
    return any(stage == 0 for stage, _ in parts)


def has_last_stage(parts: list[tuple[int, nn.Module]]) -> bool:
    # the last stage is the only one split_into_stages leaves an output layer
    return any(getattr(part, "lm_head", None) is not None for _, part in parts)


class _Stage(PipelineStage):
    """torch's PipelineStage, except that a sharded data-parallel stage reduce-scatters its gradients
    every micro-batch (torch's stage disables FSDP's sync until the end of the step, keeping
    full-size unsharded gradients across all micro-batches). Other stages behave as torch's."""

    def backward_maybe_with_nosync(self, backward_type, bwd_kwargs: dict, last_backward: bool = False):
        if not reduces_every_micro_batch(self.submod):
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
        # the same backward passes as torch's stage runs, with FSDP's sync on
        pipeline_backward_flags(self.submod, last=last_backward)
        if backward_type == "full":
            # FSDP's autograd hooks reduce-scatter each layer's gradients as its backward ends
            grads = stage_backward(bwd_kwargs["stage_output"], bwd_kwargs["output_grads"], bwd_kwargs["input_values"])
            return grads, None
        if backward_type == "input":
            # input gradients only: no weight gradient exists yet, nothing to reduce
            return stage_backward_input(bwd_kwargs["stage_output"], bwd_kwargs["output_grads"],
                                        bwd_kwargs["input_values"], self.submod.parameters())
        if backward_type == "weight":
            grads = stage_backward_weight(self.submod.parameters(), bwd_kwargs["param_groups"])
            # written straight to the weights' .grad, outside FSDP's hooks: reduce them now (the
            # last micro-batch's are reduced by the schedule's perform_reduce_grad, which follows)
            if not last_backward:
                reduce_gradients_now(self.submod)
            return grads, None
        raise RuntimeError(f"unknown backward type {backward_type!r}")


class _LossOfTheCall:
    """The loss function a schedule calls, given anew by each `run_pipeline_step`: torch's schedules
    take theirs once, at construction, while training, validation and scoring each need their own."""

    def __init__(self):
        self.fn = None

    def __call__(self, output, target):
        return self.fn(output, target)


def build_schedule(parts: list[tuple[int, nn.Module]], pp_group_or_mesh: dist.ProcessGroup | DeviceMesh,
                   device: torch.device | str, n_microbatches: int, schedule: str):
    """The torch pipelining schedule running this rank's parts; `run_pipeline_step` runs it.

    The schedule sums the losses over microbatches and does not rescale gradients. Activation
    shapes are inferred from the first microbatch, so nothing needs to know them here.
    """
    group = pp_group_or_mesh.get_group() if isinstance(pp_group_or_mesh, DeviceMesh) else pp_group_or_mesh
    num_stages = dist.get_world_size(group) * len(parts)
    device = torch.device(device)
    stages = [_Stage(part, stage, num_stages, device, group=group) for stage, part in parts]
    cls = _SCHEDULES[schedule]
    loss = _LossOfTheCall()
    if cls is Schedule1F1B:
        if len(stages) != 1:
            raise ValueError(f"the 1f1b schedule runs one stage per rank, not {len(stages)}")
        built = cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss, scale_grads=False)
    else:
        built = cls(stages, n_microbatches=n_microbatches, loss_fn=loss, scale_grads=False)
    built.loss_of_the_call = loss
    return built


def run_pipeline_step(schedule, parts: list[tuple[int, nn.Module]], tokens: torch.Tensor,
                      labels: torch.Tensor, loss_fn, *, train: bool = True,
                      **stage_kwargs) -> list[torch.Tensor] | None:
    """Forward (and, when training, backward) over one batch, split into microbatches along dim 0.

    Every stage is called as `part(x, labels=labels, **stage_kwargs)`: keyword arguments reach every
    stage (positional ones only the first); tensors are cut into the same micro-batches, so each
    stage gets its micro-batch's `position_ids` and `document_ids`, and other values reach every
    micro-batch as they are. The last stage returns its micro-batch's summed token loss, which
    `loss_fn(output, labels)` turns into what the schedule sums and backpropagates: normalised for
    the global batch (summed token loss over the global token count). Returns the per-microbatch
    losses on the rank holding the last stage, None elsewhere. Every rank of the pipeline group
    must call it with the same `train`.
    """
    args = (tokens,) if has_first_stage(parts) else ()
    losses: list[torch.Tensor] | None = [] if has_last_stage(parts) else None
    target = labels if losses is not None else None
    schedule.loss_of_the_call.fn = loss_fn
    try:
        if train:
            schedule.step(*args, target=target, losses=losses, return_outputs=False, labels=labels, **stage_kwargs)
        else:
            with torch.no_grad():
                schedule.eval(*args, target=target, losses=losses, return_outputs=False, labels=labels, **stage_kwargs)
    finally:
        schedule.loss_of_the_call.fn = None
    return losses
