"""Faults injected on purpose, for testing what the run does when a cluster misbehaves
(`--inject-fault KIND@ITERATION[:RANK]`, repeatable; a testing flag, never for production runs).

Each kind is one entry of `FAULTS`: a function `(engine)` run on the chosen rank right after the
optimizer step of the chosen iteration, before the periodic jobs (`periodic.py`) see that
iteration. RANK is a global rank, 0 when not given. Adding a kind (hang, crash, slow, loss-spike,
nan) is one function and one entry; the parser accepts only the kinds listed there.

- `bitflip`: one bit of one weight on one rank flips, as bad memory would do: the high mantissa
  bit of element 0 of this rank's first parameter (its local shard), so the value changes by a
  large fraction and the replicas of that rank no longer agree
  (`--check-weight-hash-across-dp-replicas-interval` finds it).
"""

from __future__ import annotations

import re
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


FAULTS: dict[str, Callable] = {"bitflip": flip_bit}


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
        if kind not in FAULTS:
            raise ConfigError(f"{FLAG} {spec!r}: unknown kind {kind!r}; supported: {', '.join(sorted(FAULTS))}")
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

    def after_step(self, iteration: int, engine) -> None:
        for fault in self.faults.get(iteration, ()):
            FAULTS[fault.kind](engine)
