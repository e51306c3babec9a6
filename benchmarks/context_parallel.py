"""Context parallelism on one machine: tokens/s and memory per rank of a training step, CP1 beside CP2.

    python benchmarks/context_parallel.py                          # seq 8192 and 16384, causal and packed
    python benchmarks/context_parallel.py --seq-lengths 32768 --hidden 128 --no-packed

Each configuration trains a small LLaMA2-shaped model (fp32, micro and global batch of one
sequence, AdamW, clipping) with `Engine`, in fresh processes: CP1 is one process, CP2 two gloo
processes, each with --threads-per-rank threads. One by default: at these widths OpenMP over the
two threads of a small shared machine is slower than one thread (a step of packed 8192 took 10 s
with two, 2.1 s with one), so CP2 uses two cores to CP1's one. After --warmup steps, --steps steps
are timed; tokens/s is sequence x steps / wall time, for the whole group (the CP2 ranks train one
sequence together). With --packed the same is run
again with packed documents (--reset-position-ids --reset-attention-mask --eod-mask-loss; EODs at
random, one in --mean-document tokens).

Memory, per rank (the largest over the ranks of CP2), two measures:
  * RSS growth: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs before
    the timed steps) minus its resident set just before them. It sees everything: activations kept
    for backward, gradients, kernel workspaces, gloo buffers. The ranks run with glibc's mmap
    threshold fixed, so freed tensors go back to the system instead of staying in the heap, where
    the warm-up's activations would be reused and hide the growth.
  * Tensor peak: over one more step, run under torch's profiler with memory records, the most
    bytes that torch's CPU allocator handed out during the step and held at once: every tensor and
    kernel buffer torch allocates (activations, gradients, the gathered keys and values, attention
    masks and tiles), nothing outside torch (gloo's buffers, Python objects). Parameters and
    AdamW's moments, allocated before the step, are not in it.
The RSS measure is Linux-only; elsewhere it reads as 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.profiler import DeviceType, ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_mellama.config import parse_config  # noqa: E402
from megatron_mellama.data.loader import document_ids_of  # noqa: E402
from megatron_mellama.parallel.mesh import ParallelDims  # noqa: E402
from megatron_mellama.training.engine import Engine  # noqa: E402

PACKED_FLAGS = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]
MIB = 2 ** 20


def engine_argv(args, seq: int, cp: int, packed: bool) -> list:
    return ["--model", "tiny", "--hidden-size", str(args.hidden), "--ffn-hidden-size", str(args.hidden * 11 // 4),
            "--num-layers", str(args.layers), "--vocab-size", str(args.vocab), "--seq-length", str(seq),
            "--max-position-embeddings", str(seq), "--micro-batch-size", "1", "--global-batch-size", "1",
            "--lr", "1e-4", "--weight-decay", "0.1", "--clip-grad", "1.0", "--lr-decay-style", "constant",
            # the same kernels for both sides: `auto` would time backends per process
            "--kernel-backend", "torch", "--context-parallel-size", str(cp)] + (PACKED_FLAGS if packed else [])


def make_batch(cfg, seed: int, mean_document: int) -> dict:
    """One micro-batch of random tokens, the same on every rank. Packed, it is what the loader makes
    of megatron-core's samples: EOD (the last id) ends a document, position ids restart after it,
    EODs carry no loss, and each token has its document's index."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, cfg.model.vocab_size - 1, (1, cfg.seq_length + 1), generator=g)
    if not cfg.data.reset_position_ids:
        return dict(tokens=data[:, :-1], labels=data[:, 1:], loss_mask=torch.ones(1, cfg.seq_length))
    eod = cfg.model.vocab_size - 1
    data = torch.where(torch.rand(data.shape, generator=g) < 1 / mean_document, eod, data)
    tokens = data[:, :-1]
    index = torch.arange(cfg.seq_length).expand_as(tokens)
    starts = torch.nn.functional.pad(tokens[:, :-1] == eod, (1, 0), value=True)
    position_ids = index - torch.where(starts, index, 0).cummax(dim=1).values
    return dict(tokens=tokens, labels=data[:, 1:], loss_mask=(tokens != eod).float(), position_ids=position_ids,
                document_ids=document_ids_of(position_ids))


# -- memory ------------------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))
    except (OSError, AttributeError):
        return 0


def reset_peak_rss() -> bool:
    """Lower VmHWM to the current RSS (Linux 4.0+), so that it reads the peak of what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def allocator_peak(step) -> int:
    """The most bytes torch's CPU allocator handed out during `step()` and held at once: the running
    sum of the profiler's allocation and free records, in time order (the profiler records no free
    of a block allocated before it started, so those cannot lower the sum). A dispatch mode
    would miss the buffers kernels allocate for themselves (and breaks the causal-bias tensor
    subclass that context-parallel attention builds)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    records = sorted((e for e in prof.profiler.kineto_results.events()
                      if e.name() == "[memory]" and e.device_type() == DeviceType.CPU), key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in records), initial=0))


# -- one configuration, in each rank ------------------------------------------------------------------

def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def measure_rank(args, seq: int, world: int, packed: bool) -> dict:
    cfg = parse_config(engine_argv(args, seq, world, packed), world_size=world)
    meshes = ParallelDims.from_config(cfg, world).build_mesh("cpu") if world > 1 else None
    engine = Engine(cfg, meshes)
    batch = [make_batch(cfg, seed=0, mean_document=args.mean_document)]
    for _ in range(args.warmup):
        engine.step(batch)
    _barrier(world)
    rss_before = _status_kib("VmRSS")
    peak_is_reset = reset_peak_rss()
    started = time.perf_counter()
    for _ in range(args.steps):
        engine.step(batch)
    _barrier(world)
    seconds = time.perf_counter() - started
    rss_growth = (_status_kib("VmHWM") - rss_before) * 1024 if peak_is_reset else 0
    return dict(seconds=seconds, rss_growth=rss_growth, tensor_peak=allocator_peak(lambda: engine.step(batch)))


def _rank_main(rank: int, world: int, threads: int, out_dir: str, args, seq: int, packed: bool) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        # a store file of the configuration's own: a port found free and released could be taken
        dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
    result = measure_rank(args, seq, world, packed)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run_configuration(args, seq: int, cp: int, packed: bool) -> dict:
    """`cp` fresh processes; the group's tokens/s and the largest memory figures of its ranks."""
    threads = args.threads_per_rank
    # read at process start (OpenMP, glibc), so set before spawning; the parent keeps its own
    env = dict(OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_=str(1 << 20), MALLOC_TRIM_THRESHOLD_=str(1 << 20))
    with tempfile.TemporaryDirectory() as out_dir, mock.patch.dict(os.environ, env):
        mp.start_processes(_rank_main, args=(cp, threads, out_dir, args, seq, packed), nprocs=cp,
                           join=True, start_method="spawn")
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(cp)]
    seconds = max(r["seconds"] for r in ranks)
    return dict(tokens_per_s=seq * args.steps / seconds, rss_growth=max(r["rss_growth"] for r in ranks),
                tensor_peak=max(r["tensor_peak"] for r in ranks))


# -- the table ---------------------------------------------------------------------------------------

HEADER = f"{'masking':<8} {'seq':>6} {'CP':>3} {'tokens/s':>9} {'RSS growth/rank':>16} {'tensor peak/rank':>17}"


def _row(masking: str, seq: int, cp, tokens: str, rss: str, tensors: str) -> str:
    return f"{masking:<8} {seq:>6} {cp:>3} {tokens:>9} {rss:>16} {tensors:>17}"


def print_rows(masking: str, seq: int, one: dict, two: dict) -> None:
    for cp, r in ((1, one), (2, two)):
        print(_row(masking, seq, cp, f"{r['tokens_per_s']:,.0f}", f"{r['rss_growth'] / MIB:,.1f} MiB",
                   f"{r['tensor_peak'] / MIB:,.1f} MiB"))

    def ratio(key):
        return f"{two[key] / one[key]:.2f}x" if one[key] else "-"

    print(_row(masking, seq, "2/1", ratio("tokens_per_s"), ratio("rss_growth"), ratio("tensor_peak")), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lengths", default="8192,16384", help="comma-separated sequence lengths")
    ap.add_argument("--steps", type=int, default=2, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--threads-per-rank", type=int, default=1, help="CPU threads of each process")
    ap.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True,
                    help="also with packed-document masking")
    ap.add_argument("--mean-document", type=int, default=1024, help="packed: one token in this many is an EOD")
    args = ap.parse_args(argv)
    seq_lengths = [int(s) for s in args.seq_lengths.split(",")]
    if any(s % 4 for s in seq_lengths):
        ap.error("every sequence length must be divisible by 4 (CP2 cuts it into 4 chunks)")

    print(f"hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, fp32, AdamW; {args.warmup} warm-up and "
          f"{args.steps} timed steps of one sequence; {args.threads_per_rank} thread(s) per process", flush=True)
    print(HEADER)
    for packed in (False, True) if args.packed else (False,):
        for seq in seq_lengths:
            one, two = (run_configuration(args, seq, cp, packed) for cp in (1, 2))
            print_rows("packed" if packed else "causal", seq, one, two)
    return 0


if __name__ == "__main__":
    sys.exit(main())
