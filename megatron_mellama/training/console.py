"""The run's console lines: printed by global rank 0 only (every rank reaches the same ones)."""

from __future__ import annotations

import torch.distributed as dist


def print0(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)
