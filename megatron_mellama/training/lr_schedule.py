"""Learning-rate schedules with Megatron-LM's `OptimizerParamScheduler` semantics.

Like Megatron-LM, the scheduler counts samples, not iterations: the engine calls
`step(global_batch_size)` after every applied update, and with `--train-iters` the iteration
flags are turned into samples (iterations x global batch size). Warmup is linear from 0 to the
peak (`lr = max_lr * step / warmup_steps`, reaching the peak exactly at `warmup_steps`), then the
decay style runs from the end of warmup to `decay_steps`, and `min_lr` holds afterwards.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..config import Config

WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
# The settings a checkpoint records; a resume compares them with the current flags.
_SETTINGS = ("max_lr", "min_lr", "warmup_steps", "decay_steps", "decay_style", "wsd_decay_steps",
             "wsd_decay_style")


class LRScheduler:
    """Sets `lr` on every parameter group of `optimizer` from the number of samples consumed."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, max_lr: float, min_lr: float,
                 warmup_steps: float, decay_steps: float, decay_style: str,
                 wsd_decay_steps: Optional[float] = None, wsd_decay_style: str = "exponential"):
        if not 0 <= min_lr <= max_lr:
            raise ValueError(f"learning rates must satisfy 0 <= min_lr ({min_lr}) <= max_lr ({max_lr})")
        if decay_steps <= 0:
            raise ValueError(f"the decay span must be positive, got {decay_steps}")
        if not 0 <= warmup_steps < decay_steps:
            raise ValueError(f"the warmup ({warmup_steps}) must be shorter than the decay span ({decay_steps})")
        if decay_style not in ("cosine", "linear", "constant", "WSD", "inverse-square-root"):
            raise ValueError(f"unknown learning-rate decay style {decay_style!r}")
        if decay_style == "WSD":
            if wsd_decay_steps is None:
                raise ValueError("--lr-decay-style WSD needs --lr-wsd-decay-iters")
            if not 0 < wsd_decay_steps <= decay_steps:
                raise ValueError(f"the WSD decay phase ({wsd_decay_steps}) must lie within the decay "
                                 f"span ({decay_steps})")
            if wsd_decay_style not in WSD_DECAY_STYLES:
                raise ValueError(f"unknown WSD decay style {wsd_decay_style!r}")
        self.optimizer = optimizer
        self.max_lr, self.min_lr = float(max_lr), float(min_lr)
        self.warmup_steps, self.decay_steps = warmup_steps, decay_steps
        self.decay_style = decay_style
        self.wsd_decay_steps, self.wsd_decay_style = wsd_decay_steps, wsd_decay_style
        self.num_steps = 0
        self.step(0)

    @classmethod
    def from_config(cls, optimizer: torch.optim.Optimizer, cfg: Config) -> "LRScheduler":
        """The schedule the flags describe, in samples, as Megatron-LM's `get_optimizer_param_scheduler`."""
        o, t = cfg.optim, cfg.train
        gbs = t.global_batch_size
        if gbs is None:
            raise ValueError("the learning-rate schedule needs --global-batch-size (run validation first)")
        if t.train_iters is not None:
            if o.lr_decay_samples is not None or o.lr_warmup_samples:
                raise ValueError("--train-iters counts in iterations: use --lr-decay-iters and "
                                 "--lr-warmup-iters, not the -samples flags")
            decay_iters = o.lr_decay_iters if o.lr_decay_iters is not None else t.train_iters
            decay = decay_iters * gbs
            warmup = o.lr_warmup_iters * gbs
        elif t.train_samples is not None:
            if o.lr_decay_iters is not None or o.lr_warmup_iters:
                raise ValueError("--train-samples counts in samples: use --lr-decay-samples and "
                                 "--lr-warmup-samples, not the -iters flags")
            decay = o.lr_decay_samples if o.lr_decay_samples is not None else t.train_samples
            warmup = o.lr_warmup_samples
        elif o.lr_decay_iters is not None:
            decay, warmup = o.lr_decay_iters * gbs, o.lr_warmup_iters * gbs
        elif (o.lr_decay_style == "constant" and o.lr_warmup_fraction is None
              and not o.lr_warmup_iters and not o.lr_warmup_samples):
            decay, warmup = math.inf, 0  # a constant lr needs no span (short runs, tests, benchmarks)
        else:
            raise ValueError(f"--lr-decay-style {o.lr_decay_style} needs the length of the run: "
                             "--train-iters, --train-samples or --lr-decay-iters")
        if o.lr_warmup_fraction is not None:
            warmup = o.lr_warmup_fraction * decay
        # Our only WSD length flag is in iterations; Megatron-LM's -samples variant is that times gbs.
        wsd = o.lr_wsd_decay_iters * gbs if o.lr_wsd_decay_iters is not None else None
        return cls(optimizer, max_lr=o.lr, min_lr=o.min_lr, warmup_steps=warmup, decay_steps=decay,
                   decay_style=o.lr_decay_style, wsd_decay_steps=wsd)

    def get_lr(self) -> float:
        """The learning rate after `num_steps` samples."""
        n, max_lr, min_lr = self.num_steps, self.max_lr, self.min_lr
        if self.warmup_steps > 0 and n <= self.warmup_steps:
            return max_lr * n / self.warmup_steps
        if self.decay_style == "constant":
            return max_lr
        if n > self.decay_steps:
            return min_lr
        if self.decay_style == "inverse-square-root":
            # Megatron-LM's form: the peak at the end of warmup, then ~ 1/sqrt(step), floored at min_lr.
            return max(min_lr, max_lr * math.sqrt(max(self.warmup_steps, 1)) / math.sqrt(max(n, 1)))
        ratio = (n - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:
            coeff = self._wsd_coeff(n)
        return min_lr + coeff * (max_lr - min_lr)

    def _wsd_coeff(self, n: float) -> float:
        # Stable at the peak until the last `wsd_decay_steps` of the decay span, then anneal.
        anneal_start = self.decay_steps - self.wsd_decay_steps
        if n <= anneal_start:
            return 1.0
        r = (n - anneal_start) / self.wsd_decay_steps
        if self.wsd_decay_style == "linear":
            return 1.0 - r
        if self.wsd_decay_style == "cosine":
            return 0.5 * (math.cos(math.pi * r) + 1.0)
        if self.wsd_decay_style == "minus_sqrt":
            return 1.0 - math.sqrt(r)
        return 2.0 * 0.5 ** r - 1.0  # exponential, Megatron-LM's default: 1 at r=0, 0 at r=1

    def step(self, increment: int) -> float:
        """Advance by `increment` samples (the global batch size per applied update); returns the new lr."""
        self.num_steps += increment
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, **{k: getattr(self, k) for k in _SETTINGS}}

    def _settings_that_matter(self) -> tuple:
        """The settings `get_lr` reads for this decay style (a constant schedule has no decay span)."""
        if self.decay_style == "constant":
            return ("max_lr", "warmup_steps", "decay_style")
        if self.decay_style != "WSD":
            return tuple(k for k in _SETTINGS if not k.startswith("wsd_"))
        return _SETTINGS

    def load_state_dict(self, state: dict, *, override: bool = False, use_checkpoint: bool = False) -> None:
        """Restore the position (samples consumed), with Megatron-LM's three ways for the settings:
        by default they must match the checkpoint's (those this decay style reads); `override`
        keeps this run's settings (`--override-opt_param-scheduler`, e.g. a run extended to more
        iterations decays over the new length); `use_checkpoint` takes the checkpoint's
        (`--use-checkpoint-opt_param-scheduler`: the run continues the schedule it started)."""
        if override and use_checkpoint:
            raise ValueError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler "
                             "exclude each other")
        if use_checkpoint:
            for k in _SETTINGS:
                if k in state:
                    setattr(self, k, state[k])
        elif not override:
            keys = self._settings_that_matter()
            changed = [f"{k}: checkpoint {state[k]!r}, now {getattr(self, k)!r}"
                       for k in _SETTINGS if k in keys and k in state and state[k] != getattr(self, k)]
            if changed:
                raise ValueError("the learning-rate schedule differs from the checkpoint's ("
                                 + "; ".join(changed) + "): --override-opt_param-scheduler continues with "
                                 "this run's schedule, --use-checkpoint-opt_param-scheduler with the checkpoint's")
        self.num_steps = 0
        self.step(state["num_steps"])
