"""`--dry-run`: one rank of the real world, built and stepped on this machine's CPU, memory traced.

For each rank asked for (by default rank 0 and the first rank of the last pipeline stage, the two
that hold the most), the real model of the real layout is built under a fake process group
(`torch.testing._internal.distributed.fake_pg`: collectives return at once, nothing is sent) and
`FakeTensorMode` (tensors have shapes and dtypes but no memory), then one optimizer step runs: all
micro-batches of the global batch at the real sequence length and precision, backward, gradient
clipping and AdamW. `StepTracer` records the peak of live tensor memory by kind and the bytes of
every collective. Nothing is computed, so a 70B rank steps in about a minute.

What is traced, and what is not:
- The optimizer state exists before the step (a run's second step onwards), so the peak includes it.
- Without pipeline parallelism the step is the engine's own (`Engine.compute_gradients`).
- With it, torch's pipeline schedules cannot run on fake tensors (their start-up handshake reads a
  tensor value), so the rank's stages are run in the order the schedule would run them: 1F1B's
  warm-up forwards then one-forward-one-backward, or the interleaved schedule's own action list
  (`pipeline_order`). The zero-bubble schedule is traced in that order with whole backward passes
  (its deferred weight gradients are not held). Stage-to-stage sends and receives are counted
  from the tensors' sizes.
- Kernels are the torch reference (on a GPU, fused kernels may hold less); `--compile` is not traced.
- Context parallelism: the rank runs its chunks of each sequence, as the engine splits them, and
  its chunks' lower-right causal attention is traced as on a GPU, one flash-kernel call per chunk,
  not the CPU's tiles.
- The CUDA context, NCCL buffers and allocator fragmentation are not tensors: the planner keeps
  10% of the card for them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import multiprocessing
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias

from torch.distributed.fsdp import FSDPModule

from .. import torch_private
from ..config import Config
from ..model.llama import Llama
from ..parallel.context import split_micro_batch
from ..parallel.data import pipeline_backward_flags, reduces_every_micro_batch, set_gradient_sync
from ..parallel.mesh import ParallelDims
from ..parallel.pipeline import stages_per_rank
from .memory_trace import GIB, KINDS, MemoryPeak, StepTracer

IGNORE_INDEX = -100


@dataclass
class RankTrace:
    rank: int
    coordinates: dict
    peak: MemoryPeak
    seconds: float
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(rank=self.rank, **self.coordinates, peak_gib=self.peak.total / GIB,
                    **{f"{k}_gib": v / GIB for k, v in self.peak.by_kind.items()},
                    communication={k: dict(calls=v["calls"], gib=v["bytes"] / GIB)
                                   for k, v in self.peak.communication.items()},
                    seconds=self.seconds, notes=self.notes)


def default_ranks(dims: ParallelDims) -> list[int]:
    """Rank 0 (first stage: the most micro-batches in flight) and the first rank of the last stage
    (the output layer and the loss)."""
    last = (dims.pp - 1) * dims.dp * dims.cp * dims.tp
    return sorted({0, last})


def dry_run(cfg: Config, ranks: list[int] | None = None, progress=print) -> list[RankTrace]:
    """Trace one training step of each rank in `ranks` of the world `cfg` was validated for."""
    world = cfg.parallel.world_size
    dims = ParallelDims.from_config(cfg, world)
    ranks = default_ranks(dims) if ranks is None else ranks
    for r in ranks:
        if not 0 <= r < world:
            raise ValueError(f"rank {r} is outside a world of {world}")
    cfg = copy.deepcopy(cfg)
    notes = []
    if cfg.train.kernel_backend not in ("auto", "torch"):
        notes.append(f"kernels: traced with the torch reference, not {cfg.train.kernel_backend}")
    cfg.train.kernel_backend = "torch"
    if cfg.train.compile:
        notes.append("--compile: not traced (eager)")
        cfg.train.compile = False
    # after the pipeline's warm-up (or the first micro-batch without one) every micro-batch holds
    # and sends the same: trace a few past that point, count the rest as the middle one
    p = cfg.parallel
    v = stages_per_rank(cfg.model.num_layers, dims.pp, p.num_layers_per_virtual_pipeline_stage, p.pipeline_schedule)
    cap = 4 if dims.pp == 1 else 2 * dims.pp * v + dims.pp
    micro_batches = cfg.num_microbatches
    if micro_batches > cap:
        cfg.train.global_batch_size = cap * cfg.train.micro_batch_size * dims.dp
        notes.append(f"traced {cap} of {micro_batches} micro-batches (steady state reached); communication counts "
                     f"the other {micro_batches - cap} as the middle traced one")
    for r in ranks:
        progress(f"dry run: tracing rank {r} of {world} ({_where(dims, r)}) ...")
    # one fresh process per rank: a process group leaves state behind in torch (group names held by
    # DTensor's caches), and the ranks trace side by side. Each is forked from a server that has
    # imported torch and this package once and done nothing else, instead of importing them anew
    # (seconds per rank, and per call when a planner or test traces layout after layout).
    context = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                          else "spawn")
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload([__name__])
    workers = max(1, min(len(ranks), os.cpu_count() or 1))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(_trace_rank, cfg, dims, r, list(notes), micro_batches) for r in ranks]
        return [f.result() for f in futures]


def _where(dims: ParallelDims, rank: int) -> str:
    c = dims.coordinates(rank)
    cp = f", context-parallel rank {c['cp']}" if dims.cp > 1 else ""
    return (f"pipeline stage {c['pp']} of {dims.pp}, data-parallel rank {c['dp']}{cp}, "
            f"tensor-parallel rank {c['tp']}")


@contextlib.contextmanager
def _fake_world(rank: int, world: int):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.nn.attention.bias import CausalVariant

    from ..torch_private import disable_current_modes, fake_store, unset_fake_temporarily

    if dist.is_initialized():
        raise RuntimeError("a dry run needs a process without a process group")
    torch_private.resolve("CausalBias._dispatch")  # _FlashLowerRight overrides it
    dist.init_process_group("fake", store=fake_store(), rank=rank, world_size=world)
    # FSDP builds meshes while the model is on fake tensors; a mesh's rank table is real
    original_init = DeviceMesh.__init__

    def real_mesh_init(self, *args, **kwargs):
        with unset_fake_temporarily():
            original_init(self, *args, **kwargs)

    # the model is built (and cut into stages) on the meta device first: as real meta tensors, not
    # fake ones, which `to_empty` could not swap for the fake parameters that follow
    original_model_init = Llama.__init__

    def meta_model_init(self, *args, **kwargs):
        with unset_fake_temporarily():
            original_model_init(self, *args, **kwargs)

    from ..parallel import context, parallelize

    original_split = parallelize.split_into_stages

    def meta_split(*args, **kwargs):
        with unset_fake_temporarily():
            return original_split(*args, **kwargs)

    # context parallelism as it runs on a GPU: one fused attention call per chunk (on the CPU its
    # queries go tile by tile), with a lower-right causal mask, a tensor subclass holding no data
    # that cannot be made under a dispatch mode (the fake one, the tracer)
    original_causal, original_fused = context.causal_lower_right, context.FUSED_LOWER_RIGHT_DEVICES

    def real_causal(seq_len_q: int, seq_len_kv: int):
        with disable_current_modes():
            return _FlashLowerRight(CausalVariant.LOWER_RIGHT, seq_len_q, seq_len_kv)

    DeviceMesh.__init__ = real_mesh_init
    Llama.__init__ = meta_model_init
    parallelize.split_into_stages = meta_split
    context.causal_lower_right = real_causal
    context.FUSED_LOWER_RIGHT_DEVICES = original_fused + ("cpu",)
    try:
        yield
    finally:
        DeviceMesh.__init__ = original_init
        Llama.__init__ = original_model_init
        parallelize.split_into_stages = original_split
        context.causal_lower_right = original_causal
        context.FUSED_LOWER_RIGHT_DEVICES = original_fused
        dist.destroy_process_group()


class _FlashLowerRight(CausalBias):
    """Lower-right causal attention as a GPU runs it: the flash (or memory-efficient) kernel takes the
    mask as a flag and holds what causal attention does. The CPU would instead materialise a
    (queries, keys) mask and keep it for backward, which no GPU run holds: by the shapes, 8192 x
    32768 bf16, half a GiB per layer at 32k tokens over CP2. The causal triangle's alignment
    changes no shape, so the kernel traced is SDPA's causal one over the same queries and keys."""

    @classmethod
    def _dispatch(cls, query, key, value, attn_mask, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, is_causal=True, scale=scale,
                                              enable_gqa=enable_gqa)


def _trace_rank(cfg: Config, dims: ParallelDims, rank: int, notes: list[str], micro_batches: int) -> RankTrace:
    from .engine import Engine

    started = time.perf_counter()
    with _fake_world(rank, dims.world_size):
        meshes = dims.build_mesh("cpu")
        with torch_private.fake_tensor_mode()(allow_non_fake_inputs=True):
            engine = Engine(cfg, meshes, "cpu", initialise=False)
            _create_optimizer_state(engine)
            batch = _micro_batches(cfg)
            tracer = StepTracer(engine.modules, engine.optimizer, _group_names(meshes))
            hooks = _label_accumulated_gradients(engine, tracer)
            with tracer:
                if engine.schedule is None:
                    hook = engine.modules[0].register_forward_pre_hook(lambda *_: tracer.mark())
                    engine.compute_gradients(batch)
                    hook.remove()
                else:
                    _pipeline_step(engine, batch, tracer)
                engine.optimizer.step()
                engine.optimizer.zero_grad(set_to_none=True)
            for hook in hooks:
                hook.remove()
            peak = tracer.peak(micro_batches)
    if engine.schedule is not None:
        notes.append("pipeline: the stages run in the schedule's order of forwards and backwards, not through "
                     "torch's schedule (whose start-up handshake reads a tensor value); sends and receives counted "
                     "from the tensors' sizes")
        if cfg.parallel.pipeline_schedule == "zero-bubble":
            notes.append("zero-bubble: traced with whole backward passes (deferred weight gradients not held)")
    return RankTrace(rank, dims.coordinates(rank), peak, time.perf_counter() - started, notes)


def _group_names(meshes) -> dict[str, str]:
    names = {}
    for label, mesh in (("dp", meshes.dp), ("dp-cp", meshes.dp_cp), ("dp-shard", meshes.world["dp_shard"]),
                        ("dp-shard-cp", meshes.dp_cp_shard), ("dp-replicate", meshes.dp_cp_2d["dp_replicate"]),
                        ("cp", meshes.cp), ("tp", meshes.tp), ("pp", meshes.pp)):
        names.setdefault(mesh.get_group().group_name, label)
    return names


def _label_accumulated_gradients(engine, tracer: StepTracer) -> list:
    """Before each forward of a data-parallel unit, count the full-size gradients it accumulates
    between micro-batches (DDP, or a pipeline's ZeRO-2 before FSDP reduces) as gradients: they are
    not a parameter's `.grad`, which is where the tracer looks."""
    hooks = []
    for module in (mod for part in engine.modules for mod in part.modules()):
        if not isinstance(module, FSDPModule):
            continue
        groups = torch_private.fsdp_param_groups(torch_private.fsdp_state(module))
        params = [p for g in groups for p in g.fsdp_params]

        def label(*_, params=params):
            tracer.label_gradients([getattr(p, "unsharded_accumulated_grad", None) for p in params]
                                   + [getattr(getattr(p, "_unsharded_param", None), "grad", None) for p in params])

        hooks.append(module.register_forward_pre_hook(label))
    return hooks


def _create_optimizer_state(engine) -> None:
    """AdamW's moments, as every step after the first holds them through forward and backward."""
    params = [p for m in engine.modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    engine.optimizer.step()
    engine.optimizer.zero_grad(set_to_none=True)


def _micro_batches(cfg: Config) -> list[dict]:
    b, s = cfg.train.micro_batch_size, cfg.seq_length
    return [dict(tokens=torch.zeros(b, s, dtype=torch.long), labels=torch.zeros(b, s, dtype=torch.long),
                 loss_mask=torch.ones(b, s)) for _ in range(cfg.num_microbatches)]


# -- pipeline parallel: the schedule's order of forward and backward passes --------------------------
def _actions(engine, n: int) -> list[tuple[str, int, int]]:
    """(F or B, stage, micro-batch) in the order this rank's schedule runs them."""
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti

    schedule = engine.schedule
    # Schedule1F1B runs its own loop; the action list torch 2.13 derives for it (for display)
    # skips micro-batch 0 on the last stage
    if not isinstance(schedule, PipelineScheduleMulti):  # warm-up forwards, then one backward, one forward
        (stage, _), pp = engine.parts[0], engine.dims.pp
        warmup = min(n, pp - stage)
        actions = [("F", stage, m) for m in range(warmup)]
        forward, backward = warmup, 0
        while backward < n:
            actions.append(("B", stage, backward))
            backward += 1
            if forward < n:
                actions.append(("F", stage, forward))
                forward += 1
        return actions
    out = []
    for action in schedule.pipeline_order[engine.pp_rank]:
        if action is None:
            continue
        kind = action.computation_type.value
        if kind == "F":
            out.append(("F", action.stage_index, action.microbatch_index))
        elif kind in ("B", "I"):
            out.append(("B", action.stage_index, action.microbatch_index))
    return out


def _rank_share(engine, micro_batch: dict) -> dict:
    """The tokens, labels and per-token keyword arguments a pipeline rank's stages run on: with
    context parallelism its chunks of the sequence and their positions, as the engine splits them."""
    tokens, labels = micro_batch["tokens"], micro_batch["labels"]
    if engine.dims.cp == 1:
        return dict(tokens=tokens, labels=labels, documents={})
    tokens, labels, documents = split_micro_batch(tokens, labels, {}, engine.dims.cp,
                                                  engine.meshes.cp.get_local_rank())
    return dict(tokens=tokens, labels=labels, documents=documents)


def _pipeline_step(engine, micro_batches: list[dict], tracer: StepTracer) -> None:
    """This rank's stages over every micro-batch, forward and backward; sends and receives are
    counted into `tracer`'s communication."""
    cfg, m = engine.cfg, engine.cfg.model
    parts = dict(engine.parts)
    last_stage = engine.dims.pp * len(parts) - 1
    micro_batches = [_rank_share(engine, mb) for mb in micro_batches]
    seq = cfg.seq_length // engine.dims.cp
    seq = seq // engine.dims.tp if cfg.parallel.sequence_parallel else seq
    dtype = engine.autocast_dtype or torch.float32
    hidden_shape = (cfg.train.micro_batch_size, seq, m.hidden_size)
    actions = _actions(engine, len(micro_batches))
    last_backward = {}
    for kind, stage, mb in actions:
        if kind == "B":
            last_backward[stage] = mb
    first_local = min(parts)

    def count(direction: str, t: torch.Tensor) -> None:
        tracer.count(f"{direction} pp", t.numel() * t.element_size())

    in_flight = {}
    for kind, stage, mb in actions:
        part = parts[stage]
        if kind == "F":
            if stage == first_local:
                tracer.mark()
            if stage == 0:
                x = micro_batches[mb]["tokens"]
            else:
                x = torch.empty(hidden_shape, dtype=dtype).requires_grad_()
                count("recv", x)
            with engine._autocast():
                out = part(x, labels=micro_batches[mb]["labels"], **micro_batches[mb]["documents"])
            if stage != last_stage:
                count("send", out)
            in_flight[stage, mb] = (x, out)
            continue
        x, out = in_flight.pop((stage, mb))
        if reduces_every_micro_batch(part):  # as parallel/pipeline.py's stage does
            pipeline_backward_flags(part, last=mb == last_backward[stage])
        else:
            set_gradient_sync(part, mb == last_backward[stage])
        if stage == last_stage:
            out.backward(torch.ones_like(out))
        else:
            grad = torch.empty_like(out)
            count("recv", grad)
            out.backward(grad)
        if stage != 0:
            count("send", x.grad)
        del x, out
    # the schedule's end-of-step reduction reshards every unit (FSDPModule.reshard is per unit)
    for module in (mod for part in parts.values() for mod in part.modules()):
        if isinstance(module, FSDPModule):
            module.reshard()


def format_report(cfg: Config, traces: list[RankTrace], gpu_memory_gb: float | None = None) -> str:
    p = cfg.parallel
    cp = f" x CP {p.context_parallel_size}" if p.context_parallel_size > 1 else ""
    lines = [f"dry run: TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size} x "
             f"DP {p.data_parallel_size}{cp} ({p.world_size} GPUs), micro-batch {cfg.train.micro_batch_size} x "
             f"{cfg.num_microbatches}, sequence {cfg.seq_length}, "
             f"{'bf16' if cfg.train.bf16 else 'fp16' if cfg.train.fp16 else 'fp32'}, "
             f"sharding {p.data_parallel_sharding}, recompute {p.recompute_granularity or 'none'}"
             + (f", {p.pipeline_schedule}" if p.pipeline_model_parallel_size > 1 else "")]
    header = ["rank", "stage"] + list(KINDS) + ["peak GiB"]
    rows = [header]
    for t in traces:
        gib = t.peak.gib()
        rows.append([str(t.rank), str(t.coordinates["pp"])] + [f"{gib[k]:.2f}" for k in KINDS]
                    + [f"{gib['total']:.2f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    for t in traces:
        comm = ", ".join(f"{k} {v['calls']}x {v['bytes'] / GIB:.2f} GiB"
                         for k, v in sorted(t.peak.communication.items()) if v["calls"])
        lines.append(f"rank {t.rank} communication per step: {comm or 'none'} (traced in {t.seconds:.0f} s)")
    if gpu_memory_gb:
        worst = max(t.peak.total for t in traces) / GIB
        lines.append(f"peak {worst:.1f} GiB of tensors on a {gpu_memory_gb:g} GiB card: "
                     f"{'fits' if worst <= 0.9 * gpu_memory_gb else 'does NOT fit'} with 10% kept for the "
                     f"CUDA context, NCCL and fragmentation")
    for note in sorted({n for t in traces for n in t.notes}):
        lines.append(f"note: {note}")
    return "\n".join(lines)


__all__ = ["dry_run", "default_ranks", "format_report", "RankTrace"]
