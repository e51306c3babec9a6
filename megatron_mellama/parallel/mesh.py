"""ParallelDims: how the world splits into pipeline x data x context x tensor parallel groups, and its DeviceMesh.

Rank layout follows Megatron-LM: tensor parallel innermost (neighbouring ranks, one node's fast
links), then context parallel, then data parallel, then pipeline outermost. Data parallel may
itself split into replicate x shard (HSDP: shard within a node, replicate across nodes).

Context-parallel ranks read the same micro-batches (they share the data-parallel index) and hold
the same parameters, each computing the loss of its part of the sequence: for gradients they are
data-parallel ranks. So parameters are replicated or sharded over data x context parallel
(`Meshes.dp_cp`, `dp_cp_2d`), as torchtitan does, while the data is split over `dp` alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config import Config, ConfigError
from ..torch_private import flatten_mesh, unflatten_mesh

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    cp: int = 1

    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> "ParallelDims":
        p = cfg.parallel
        tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
        if world_size % (tp * pp * cp):
            raise ConfigError(f"the world size {world_size} must be a multiple of --tensor-model-parallel-size {tp} "
                              f"x --pipeline-model-parallel-size {pp} x --context-parallel-size {cp}")
        dp = world_size // (tp * pp * cp)
        if p.data_parallel_sharding == "none":
            replicate, shard = dp, 1
        else:
            replicate = p.data_parallel_replicate_size
            if dp % replicate:
                raise ConfigError(f"--data-parallel-replicate-size {replicate} must divide the data-parallel size {dp}")
            shard = dp // replicate
        return cls(pp=pp, dp_replicate=replicate, dp_shard=shard, tp=tp, cp=cp)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    def build_mesh(self, device_type: str) -> "Meshes":
        world = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp),
                                 mesh_dim_names=MESH_DIMS)
        dp = flatten_mesh(world["dp_replicate", "dp_shard"], "dp")
        if self.cp == 1:  # the same groups as without context parallelism
            dp_cp, dp_cp_2d = dp, world["dp_replicate", "dp_shard"]
        else:
            dp_cp = flatten_mesh(world["dp_replicate", "dp_shard", "cp"], "dp_cp")
            dp_cp_2d = unflatten_mesh(dp_cp, 0, (self.dp_replicate, self.dp_shard * self.cp), ("dp_replicate", "dp_shard_cp"))
        return Meshes(world=world, pp=world["pp"], tp=world["tp"], cp=world["cp"], dp=dp, dp_cp=dp_cp,
                      dp_cp_2d=dp_cp_2d)

    def coordinates(self, rank: int) -> dict:
        """pp / dp / cp / tp index of a global rank, from the layout alone (no process group needed)."""
        tp = rank % self.tp
        cp = (rank // self.tp) % self.cp
        dp = (rank // (self.tp * self.cp)) % self.dp
        pp = rank // (self.tp * self.cp * self.dp)
        return dict(pp=pp, dp=dp, cp=cp, tp=tp)


@dataclass(frozen=True)
class Meshes:
    """The world mesh and the sub-meshes each kind of parallelism works on."""

    world: DeviceMesh
    pp: DeviceMesh
    tp: DeviceMesh
    cp: DeviceMesh
    dp: DeviceMesh  # replicate x shard flattened: the ranks that read different micro-batches
    dp_cp: DeviceMesh  # dp x cp flattened: all ranks holding the same model part (gradients reduce here)
    dp_cp_2d: DeviceMesh  # (dp_replicate, dp_shard [x cp]), for FSDP2 / HSDP

    @property
    def dp_cp_shard(self) -> DeviceMesh:
        """The ranks a parameter is sharded over: dp_shard, times cp when there is context parallelism."""
        return self.dp_cp_2d[self.dp_cp_2d.mesh_dim_names[1]]


def local_device() -> torch.device:
    """The device this process computes on: its GPU (torchrun's LOCAL_RANK), or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def process_group_backend(device: torch.device, backend: str | None = None) -> str:
    """The default group's backend for `device`.

    On GPUs NCCL takes device tensors and gloo takes CPU ones ("cpu:gloo,cuda:nccl"), so objects
    (`broadcast_object_list`, DCP's planning) and any CPU tensor work too; NCCL alone fails on the
    first CPU tensor. `backend` "gloo" keeps everything on gloo."""
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("--distributed-backend nccl needs GPUs, and none is visible here")
    if backend == "gloo" or device.type != "cuda":
        return "gloo"
    return "cpu:gloo,cuda:nccl"


def torchrun_attempt_store(timeout: timedelta) -> dist.Store | None:
    """The store of this torchrun attempt: the agent's store with every key under `attempt<N>/`
    (N = TORCHELASTIC_RESTART_COUNT); None outside torchrun, or when torchrun gives each attempt a
    fresh store of its own (TORCHELASTIC_USE_AGENT_STORE not True).

    torchrun hosts one store for the whole job and hands the same MASTER_ADDR/MASTER_PORT to every
    attempt; torch's env:// start uses it unprefixed, so after a restart the gloo mesh can read the
    addresses a dead attempt's ranks published and fail to connect (`Connection refused`)."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != str(True) or "TORCHELASTIC_RESTART_COUNT" not in env:
        return None
    agent = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"]), is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"attempt{int(env['TORCHELASTIC_RESTART_COUNT'])}", agent)  # keys "attempt<N>/..."


def init_distributed(backend: str | None = None, timeout_minutes: float = 30.0) -> torch.device:
    """Start the default process group from torchrun's environment, once; returns this rank's device.

    `timeout_minutes` bounds every collective, including barriers that wait for rank 0 to build
    the data index or for a large checkpoint load, and the wait for the other ranks to join. Under
    torchrun each restart attempt meets on keys of its own (`torchrun_attempt_store`)."""
    device = local_device()
    if dist.is_initialized():
        return device
    timeout = timedelta(minutes=timeout_minutes)
    kwargs = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # binds NCCL to this GPU at once, so barriers and the first collective use it
        kwargs["device_id"] = device
    store = torchrun_attempt_store(timeout)
    if store is not None:
        kwargs.update(store=store, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    dist.init_process_group(process_group_backend(device, backend), timeout=timeout, **kwargs)
    return device
