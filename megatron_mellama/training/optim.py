"""AdamW with Megatron-LM's two parameter groups: weight decay on matrices, none on norms.

Also the one import point for the rest of the optimizer step: the learning-rate schedule,
gradient clipping and loss scaling live in their own modules and are re-exported here.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch import nn

from ..config import Config
from .grad_clip import clip_grad_norm_, get_grad_norm
from .loss_scaler import LossScaler
from .lr_schedule import LRScheduler

__all__ = ["build_optimizer", "param_groups", "build_lr_scheduler", "LRScheduler", "clip_grad_norm_",
           "get_grad_norm", "LossScaler"]


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    # Megatron-LM's rule: biases and every 1-D parameter (RMSNorm weights) are not decayed.
    # `param.shape` is the global shape, so a sharded DTensor is classified like the full tensor.
    return name.endswith(".bias") or len(param.shape) == 1


def param_groups(model_parts: list[nn.Module], weight_decay: float) -> list[dict]:
    """The decayed and the undecayed trainable parameters of all model parts, in model order.

    Both groups are always present (possibly empty) so that every pipeline stage's optimizer has
    the same group layout, which keeps checkpoints and schedulers uniform across stages.
    """
    decay, no_decay, seen = [], [], set()
    for part in model_parts:
        for name, param in part.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if _no_weight_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model_parts: list[nn.Module], cfg: Config) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `model_parts` (plain tensors or DTensors).

    The update is elementwise, so a sharded run steps exactly like one process given the same
    gradients. The learning rate set here is the peak; the scheduler overwrites it every step.
    """
    o = cfg.optim
    groups = param_groups(model_parts, o.weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError("build_optimizer: the model parts have no trainable parameters")
    params = [p for g in groups for p in g["params"]]
    # the fused kernel (one pass over all tensors, CPU and GPU) where it applies; DTensors take the
    # multi-tensor path, which handles their placements
    fused = not any(isinstance(p, DTensor) for p in params)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                             weight_decay=o.weight_decay, fused=fused or None, foreach=None if fused else True)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> LRScheduler:
    """The schedule the flags describe; step it by the global batch size after each applied update."""
    return LRScheduler.from_config(optimizer, cfg)
