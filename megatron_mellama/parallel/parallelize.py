"""Apply the run's parallelisms to a model built on the meta device: the one entry point.

The order matters. The pipeline split comes first (each stage is a copy of the whole model with
the parts it does not own removed). Tensor parallelism then shards each part's weights, context
parallelism replaces its attention, and activation checkpointing wraps its layers: all on meta
tensors, so nothing is allocated that a rank will not keep. Each part is then materialised (memory
on the run's device and, unless a checkpoint supplies the weights, initial values), compiled layer
by layer, and last wrapped for data parallelism, which composes with the tensor-parallel DTensors
already there and casts the weights to the compute dtype.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import Config
from ..model.llama import Llama
from .context import apply_context_parallel
from .data import apply_data_parallel
from .mesh import Meshes, ParallelDims
from .pipeline import split_into_stages
from .recompute import apply_activation_checkpointing, apply_compile
from .tensor import apply_tensor_parallel


def parallelize(model: Llama, cfg: Config, dims: ParallelDims, meshes: Meshes | None, *,
                materialise: Callable[[nn.Module], object],
                param_dtype: torch.dtype | None = None) -> list[tuple[int, nn.Module]]:
    """This rank's (pipeline stage index, module) parts of `model` (on the meta device), parallelised.

    `materialise(part)` gives a sharded part its memory and values, in place. `param_dtype` is the
    compute dtype data parallelism casts the weights to (None keeps fp32); without `meshes` (one
    process, no process group) there is no data-parallel wrapper.
    """
    p = cfg.parallel
    if dims.pp > 1:
        parts = split_into_stages(model, meshes.pp.get_local_rank(), dims.pp,
                                  p.num_layers_per_virtual_pipeline_stage, p.pipeline_schedule)
    else:
        parts = [(0, model)]
    for _, part in parts:
        if dims.tp > 1:
            apply_tensor_parallel(part, meshes.tp, p.sequence_parallel)
        if dims.cp > 1:
            apply_context_parallel(part, meshes.cp, cfg.seq_length)
        if p.recompute_granularity:
            apply_activation_checkpointing(part, p.recompute_granularity)
        materialise(part)
        if cfg.train.compile:
            apply_compile(part)
        if meshes is not None:
            # at DP 1 without mixed precision this leaves the part as it is
            apply_data_parallel(part, meshes, p.data_parallel_sharding, param_dtype=param_dtype,
                                reduce_dtype=torch.float32, reduce_once_per_step=p.reduce_grads_once_per_step)
    return parts
