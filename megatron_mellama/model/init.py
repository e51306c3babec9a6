"""Initial parameter values that do not depend on the parallel layout.

Each tensor draws from a generator seeded by the run's seed and the tensor's name, so the values do
not depend on which tensors a process holds or in which order it initialises them: any tensor,
pipeline or data-parallel layout starts from the same weights.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..config import ModelConfig


def initial_value(cfg: ModelConfig, name: str, shape: tuple, seed: int | None = None) -> torch.Tensor:
    """The fp32 initial value of parameter `name`, on the CPU.

    Normal(0, std) for matrices, with the output projections of each block scaled by
    1/sqrt(2 * layers) as Megatron-LM does; ones for norms.
    """
    if name.endswith("layernorm.weight") or name == "norm.weight":
        return torch.ones(shape)
    std = cfg.init_method_std
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        std /= math.sqrt(2.0 * cfg.num_layers)
    generator = torch.Generator(device="cpu").manual_seed(_name_seed(0 if seed is None else seed, name))
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator)


def _name_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed from the run's seed and a parameter name (Python's hash() is salted)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def initialise_parameters(module: nn.Module, cfg: ModelConfig, seed: int | None, device: torch.device) -> None:
    """Fill every parameter of `module` (a model or one pipeline stage of it) with its initial value.

    A parameter sharded over a device mesh (a DTensor) receives its shard of the full value: every
    rank computes the same full value, so no communication is needed.
    """
    for name, param in module.named_parameters():
        if isinstance(param, DTensor):
            full = initial_value(cfg, name, tuple(param.shape), seed).to(device)
            param.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None))
        else:
            param.copy_(initial_value(cfg, name, tuple(param.shape), seed))
