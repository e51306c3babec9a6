"""Loss scaling for fp16: Megatron-LM's dynamic scaler (with hysteresis) or a static scale.

bf16 and fp32 need no scaling; they get a disabled scaler whose scale is 1 and whose methods
do nothing, so the engine calls the same methods for every precision.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..config import Config
from ..torch_private import foreach_mul_


def _gradients(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    # A parameter (trainable or frozen) stands for its gradient; never scale the weights themselves.
    grads = [t.grad if isinstance(t, nn.Parameter) or t.requires_grad else t for t in tensors]
    return [g for g in grads if g is not None]


class LossScaler:
    """`scale(loss)` before backward; `unscale_(grads)` -> found_inf; `update(found_inf)` after.

    Dynamic scaling (Megatron-LM's `DynamicGradScaler`): every overflow costs one unit of
    hysteresis and resets the growth count; when the hysteresis is spent the scale is multiplied
    by `backoff_factor` (never below `min_scale`). After `growth_interval` consecutive clean steps
    the scale grows by `growth_factor` and the hysteresis is refilled.
    """

    def __init__(self, initial_scale: float = 2.0 ** 32, *, dynamic: bool = True, enabled: bool = True,
                 min_scale: float = 1.0, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 1000, hysteresis: int = 2):
        if enabled and not initial_scale > 0:
            raise ValueError(f"the loss scale must be positive, got {initial_scale}")
        if enabled and dynamic and not (growth_factor > 1 and 0 < backoff_factor < 1 and growth_interval > 0
                                        and hysteresis > 0 and 0 < min_scale <= initial_scale):
            raise ValueError("dynamic loss scaling needs growth_factor > 1, 0 < backoff_factor < 1, "
                             "growth_interval > 0, hysteresis > 0 and 0 < min_scale <= initial_scale")
        self.enabled = enabled
        self.dynamic = dynamic and enabled
        self.loss_scale = float(initial_scale) if enabled else 1.0
        self.min_scale, self.growth_factor, self.backoff_factor = min_scale, growth_factor, backoff_factor
        self.growth_interval, self.hysteresis = growth_interval, hysteresis
        self.growth_tracker = 0
        self.hysteresis_tracker = hysteresis

    @classmethod
    def from_config(cls, cfg: Config) -> "LossScaler":
        t = cfg.train
        if not t.fp16:
            return cls(enabled=False, dynamic=False)
        if t.loss_scale is not None:
            return cls(t.loss_scale, dynamic=False)
        return cls(t.initial_loss_scale)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on."""
        return loss * self.loss_scale if self.enabled else loss

    def unscale_(self, tensors: Iterable[torch.Tensor], group: Optional[dist.ProcessGroup] = None,
                 find_inf: bool = True, device: torch.device | str | None = None) -> bool | None:
        """Divide the gradients by the scale in place; True when any gradient on any rank is inf/NaN.

        `tensors` are parameters (their `.grad` is unscaled) or gradients themselves. The overflow
        flag is max-reduced over `group` (default: every rank, when distributed) so that all ranks
        skip the same steps; reading it is a host synchronisation. `find_inf=False` only unscales
        and returns None (the engine judges overflow from the gradient norm it reads anyway).
        `device`: where a rank without gradients puts its flag for the reduction (the run's
        device). Disabled scalers return False without looking.
        """
        if not self.enabled:
            return False
        inv = 1.0 / self.loss_scale  # exact: scales are powers of two unless set otherwise
        grads = [g.to_local() if isinstance(g, DTensor) else g for g in _gradients(tensors)]
        if grads:
            foreach_mul_(grads, inv)
        if not find_inf:
            return None
        found = None
        for local in grads:
            bad = (~torch.isfinite(local)).any().float()
            found = bad if found is None else torch.maximum(found, bad)
        if found is None:
            found = torch.zeros((), device=device if device is not None else "cpu")
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
        return bool(found.item())

    def update(self, found_inf: bool) -> None:
        if not self.dynamic:
            return
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.loss_scale = max(self.loss_scale * self.backoff_factor, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.loss_scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.loss_scale, "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        # A static or disabled scaler keeps its configured scale: the flags decide, not the checkpoint.
        if self.dynamic:
            self.loss_scale = float(state["scale"])
            self.growth_tracker = int(state["growth_tracker"])
            self.hysteresis_tracker = int(state["hysteresis_tracker"])
