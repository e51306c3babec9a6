"""Replica check (`--check-weight-hash-across-dp-replicas-interval N`): the ranks that should hold
identical weights compare a checksum of them every N iterations and before every save; a mismatch
(a bit flipped by bad memory, a replica that went its own way) stops the run with exit code 1
before the save, naming the iteration and the ranks, so no corrupted checkpoint is published.

Which ranks hold the same weights: those of one pipeline stage and tensor-parallel rank that
differ only in their data-parallel or context-parallel index (`replica_groups`). Under
`--data-parallel-sharding optimizer` or `full` a parameter is sharded over data x context parallel,
so only HSDP's replicate dimension (`--data-parallel-replicate-size`) holds copies of a shard.

The checksum, not a cryptographic hash (it finds flipped bits, not an adversary): every local
parameter (this rank's shard) viewed as integers of its width; per parameter the wrapping int64
sum of its elements and the sum weighted by position (a flipped bit changes the first, moved
values the second); the parameters folded with distinct odd weights into two int64 numbers. All on
the device, no host sync per parameter; then one all_gather of those two numbers over every rank
(not over the replica group alone: every rank must take the same stop decision, or the ranks of a
clean group would wait in the save's collectives for those that stopped) and one host read.
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ...parallel.mesh import ParallelDims
from ..console import print0
from ..run_control import TrainingStopped
from ..run_state import RunState

FLAG = "--check-weight-hash-across-dp-replicas-interval"
_AS_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SLICE = 1 << 22  # elements per slice: three int64 temporaries of 32 MiB at most


def replica_groups(dims: ParallelDims, sharding: str) -> list[list[int]]:
    """The sets of global ranks that hold identical local parameters (groups of one included)."""
    sharded = sharding != "none" and dims.dp * dims.cp > 1
    groups: dict[tuple, list[int]] = {}
    for rank in range(dims.world_size):
        c = dims.coordinates(rank)
        # dp = replicate index x dp_shard + shard index (the mesh's order); a shard spans dp_shard x cp
        key = (c["pp"], c["tp"]) + ((c["dp"] % dims.dp_shard, c["cp"]) if sharded else ())
        groups.setdefault(key, []).append(rank)
    return list(groups.values())


def weights_checksum(modules, device: torch.device) -> torch.Tensor:
    """Two int64 numbers that change when any bit of this rank's local parameters does (see above)."""
    total = torch.zeros(2, dtype=torch.int64, device=device)
    with torch.no_grad():
        for index, param in enumerate(p for m in modules for p in m.parameters()):
            local = param.to_local() if isinstance(param, DTensor) else param
            flat = local.detach().contiguous().view(-1).view(_AS_INT[local.element_size()])
            sums = torch.zeros(2, dtype=torch.int64, device=flat.device)
            # in slices: the int64 copies of a whole embedding shard would be gigabytes on the GPU
            for start in range(0, flat.numel(), _SLICE):
                values = flat[start:start + _SLICE].to(torch.int64)
                position = torch.arange(start + 1, start + values.numel() + 1, dtype=torch.int64, device=flat.device)
                sums += torch.stack([values.sum(), (values * position).sum()])
            total += sums.to(device) * (2 * index + 1)  # int64 arithmetic wraps: a checksum, not a total
    return total


def mismatches(checksums: list[tuple], groups: list[list[int]]) -> list[tuple[list[int], list[int]]]:
    """Per group whose ranks disagree: (the ranks that differ from the group's majority, the others);
    with no majority (as with two replicas) every rank of the group, and no others."""
    found = []
    for group in groups:
        counts: dict[tuple, int] = {}
        for rank in group:
            counts[checksums[rank]] = counts.get(checksums[rank], 0) + 1
        if len(counts) == 1:
            continue
        common, n = max(counts.items(), key=lambda kv: kv[1])
        if n > len(group) / 2:
            found.append(([r for r in group if checksums[r] != common], [r for r in group if checksums[r] == common]))
        else:
            found.append((group, []))
    return found


def describe(found: list[tuple[list[int], list[int]]], hosts: list[str]) -> str:
    def named(ranks):
        return " and ".join(f"rank {r} ({hosts[r]})" for r in ranks)

    return "; ".join(f"{named(odd)} differ{'s' if len(odd) == 1 else ''} from {named(rest)}" if rest else
                     f"{named(odd)} disagree, with no majority to tell which is right" for odd, rest in found)


class ReplicaCheck:
    def __init__(self, cfg, engine, dims: ParallelDims, saving):
        """`saving`: the checkpoint-saving job; the check also runs whenever it is due."""
        self.interval = cfg.train.check_weight_hash_across_dp_replicas_interval
        self.engine, self.saving = engine, saving
        self.groups = replica_groups(dims, cfg.parallel.data_parallel_sharding)
        if self.interval and all(len(g) == 1 for g in self.groups):
            print0(f"{FLAG}: no two ranks of this layout hold the same weights (no data-parallel replicas); "
                   "nothing to compare")
            self.interval = None
        if self.interval:
            # once, at start-up: a mismatch is then named without a second collective
            self.hosts = [None] * dist.get_world_size()
            dist.all_gather_object(self.hosts, socket.gethostname())

    def due(self, state: RunState) -> bool:
        if not self.interval:
            return False
        return state.iteration % self.interval == 0 or self.saving.due(state)

    def run(self, state: RunState) -> None:
        checksum = weights_checksum(self.engine.modules, self.engine.device)
        gathered = [torch.empty_like(checksum) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, checksum)
        checksums = [tuple(row) for row in torch.stack(gathered).tolist()]
        found = mismatches(checksums, self.groups)
        if found:
            raise TrainingStopped(f"the weights of data-parallel replicas differ after iteration {state.iteration} "
                                  f"({FLAG}; a flipped bit, or a replica that diverged): {describe(found, self.hosts)}; "
                                  "nothing was saved at this iteration")
