"""Building a model: on the meta device first (shapes only, no memory), then materialised.

Every place that makes a model goes through these two steps: training builds on meta, cuts and
shards the model (`parallel.parallelize`) and materialises each part it keeps; evaluation and
conversion build the whole model in one process; the converter needs the shapes alone.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .init import initialise_parameters
from .llama import Llama
from .rope import rotary_tables


def meta_model(cfg: ModelConfig) -> Llama:
    """The model on the meta device: every shape, no memory."""
    with torch.device("meta"):
        return Llama(cfg)


@torch.no_grad()
def materialise(model: nn.Module, cfg: ModelConfig, device: str | torch.device, *, seed: int | None = None,
                initialise: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """Give a meta-device model (or a pipeline stage of one, sharded or not) memory on `device`, in place.

    The rotary tables are always computed (no checkpoint holds them), in fp32 whatever `dtype`.
    `initialise=False` leaves the parameters unset (memory allocated, values undefined): for a model
    that loads every weight from a checkpoint next, or a dry run under fake tensors. `dtype` casts
    the parameters (evaluation in bf16); training keeps fp32 master weights.
    """
    device = torch.device(device)
    model.to_empty(device=device)
    if dtype is not None:
        model.to(dtype)
    model.rope_cos, model.rope_sin = rotary_tables(cfg, device=device)
    if initialise:
        initialise_parameters(model, cfg, seed, device)
    return model


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int | None = None, *,
                initialise: bool = True, dtype: torch.dtype | None = None) -> Llama:
    """The whole model in one process: built on meta, materialised on `device` and initialised."""
    return materialise(meta_model(cfg), cfg, device, seed=seed, initialise=initialise, dtype=dtype)
