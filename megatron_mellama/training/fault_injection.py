"""Faults injected on purpose, for testing what the run does when a cluster misbehaves
(`--inject-fault KIND@ITERATION[:RANK]`, repeatable; a testing flag, never for production runs).

Each kind is one entry of `FAULTS`: a function `(engine)` run on the chosen rank right after the
optimizer step of the chosen iteration, before the periodic jobs (`periodic.py`) see that
iteration. RANK is a global rank, 0 when not given. Adding a kind is one function and one entry;
the parser accepts only the kinds listed there.

- `bitflip`: one bit of one weight on one rank flips, as bad memory would do: the high mantissa
  bit of element 0 of this rank's first parameter (its local shard), so the value changes by a
  large fraction and the replicas of that rank no longer agree
  (`--check-weight-hash-across-dp-replicas-interval` finds it).
- `hang`: that rank's main thread blocks for good (sleeps in a loop, deaf to SIGTERM as a rank stuck
  in a collective is); `--distributed-timeout-seconds-after-init` finds it.
- `crash`: that rank's process exits at once with code 1, after one line saying so.
- `slow`: every optimizer step of that rank from then on sleeps `SLOW_SECONDS` first: compute time
  of its own, as a slow GPU's, not time spent waiting for others.
A hang or a crash is an event: a restarted attempt of the job (torchrun's TORCHELASTIC_RESTART_COUNT
above 0) does not meet it again, so the restart can be tested; a slow rank stays slow.

The faults in the loss act before the chosen iteration's step (`before_step`, `LOSS_FAULTS`): the
loss that rank computes in that step is multiplied by a factor, and so are its gradients (the
engine multiplies each micro-batch's loss before backward; `Engine.injected_loss_factors`).
- `loss-spike`: by 1000, a loss spike (`--check-for-spiky-loss` finds it).
- `nan`: NaN, in every computation of the step: the recomputation is NaN too, and the step is skipped.
- `nan-transient`: NaN in the first computation only: the recomputation is finite and applied,
  and the run names the rank.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from typing import Callable, NamedTuple

import torch
from torch.distributed.tensor import DTensor

from ..config import ConfigError

FLAG = "--inject-fault"

# the integer type of the same width as each floating type, and its highest mantissa bit
_BITS = {torch.float32: (torch.int32, 1 << 22), torch.bfloat16: (torch.int16, 1 << 6),
         torch.float16: (torch.int16, 1 << 9), torch.float64: (torch.int64, 1 << 51)}


def flip_bit(engine) -> None:
    param = next(p for m in engine.modules for p in m.parameters())
    local = param.to_local() if isinstance(param, DTensor) else param
    as_int, bit = _BITS[local.dtype]
    with torch.no_grad():
        # a view of the element in the parameter's own storage: the flip persists, on the device
        local.view(-1)[:1].view(as_int).bitwise_xor_(bit)


SLOW_SECONDS = 0.5


def _say(what: str) -> None:
    print(f"rank {os.environ.get('RANK', '0')}: {FLAG} {what}", file=sys.stderr, flush=True)


def _restarted() -> bool:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def hang(engine) -> None:
    if _restarted():
        return
    _say("hang: this rank's main thread blocks for good")
    while True:
        time.sleep(60)


def crash(engine) -> None:
    if _restarted():
        return
    _say("crash: this rank's process exits now with code 1")
    os._exit(1)


def slow(engine) -> None:
    if getattr(engine.optimizer, "_injected_slow", False):  # a rollback past the iteration: once is enough
        return
    _say(f"slow: every optimizer step of this rank sleeps {SLOW_SECONDS} s from now on")
    engine.optimizer._injected_slow = True
    engine.optimizer.register_step_pre_hook(lambda *args: time.sleep(SLOW_SECONDS))


FAULTS: dict[str, Callable] = {"bitflip": flip_bit, "hang": hang, "crash": crash, "slow": slow}

# what each computation of the step multiplies the loss by (the last factor holds for any further one)
SPIKE_FACTOR = 1e3
LOSS_FAULTS: dict[str, tuple] = {"loss-spike": (SPIKE_FACTOR,), "nan": (math.nan,), "nan-transient": (math.nan, 1.0)}


class Fault(NamedTuple):
    kind: str
    iteration: int
    rank: int


_SPEC = re.compile(r"([a-z-]+)@(\d+)(?::(\d+))?")


def parse_faults(specs: list[str] | None) -> list[Fault]:
    """The faults `--inject-fault` asks for; ConfigError (one line naming the flag) for any other text."""
    faults = []
    for spec in specs or []:
        match = _SPEC.fullmatch(spec)
        if not match:
            raise ConfigError(f"{FLAG} {spec!r}: expected KIND@ITERATION[:RANK], e.g. bitflip@3:1")
        kind, iteration, rank = match.group(1), int(match.group(2)), int(match.group(3) or 0)
        if kind not in FAULTS and kind not in LOSS_FAULTS:
            raise ConfigError(f"{FLAG} {spec!r}: unknown kind {kind!r}; supported: "
                              f"{', '.join(sorted([*FAULTS, *LOSS_FAULTS]))}")
        if iteration < 1:
            raise ConfigError(f"{FLAG} {spec!r}: the iteration must be 1 or more")
        faults.append(Fault(kind, iteration, rank))
    return faults


class FaultInjector:
    """This rank's share of the injected faults; `after_step` does nothing on every other iteration."""

    def __init__(self, faults: list[Fault], rank: int, world: int):
        for fault in faults:
            if fault.rank >= world:
                raise ConfigError(f"{FLAG} {fault.kind}@{fault.iteration}:{fault.rank}: there are only {world} "
                                  f"ranks")
        self.faults: dict[int, list[Fault]] = {}
        for fault in faults:
            if fault.rank == rank:
                self.faults.setdefault(fault.iteration, []).append(fault)
        # a slow rank stays slow, also in an attempt resumed after the fault's iteration
        self.lasting = [fault for fault in faults if fault.rank == rank and fault.kind == "slow"]

    def before_step(self, iteration: int, engine) -> None:
        """Before the step of `iteration` (the one about to run): the faults in its loss."""
        for fault in self.faults.get(iteration, ()):
            if fault.kind in LOSS_FAULTS:
                engine.injected_loss_factors = LOSS_FAULTS[fault.kind]

    def after_step(self, iteration: int, engine) -> None:
        for fault in self.lasting:
            if fault.iteration < iteration:
                slow(engine)  # acts once
        for fault in self.faults.get(iteration, ()):
            if fault.kind in FAULTS:
                FAULTS[fault.kind](engine)
