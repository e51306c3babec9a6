"""Rank every TP x PP x DP (x CP) layout of a model on a cluster by estimated memory per GPU and step time.

    mellama-plan-layout --model llama2-13b --seq-length 4096 --micro-batch-size 1 \\
        --global-batch-size 1024 --gpu-memory-gb 80 --num-gpus 160 --recompute selective

A layout is listed when TP is a power of two of at most 8 (one node), dividing the query and
key/value heads, PP divides the layers, and the project's own config validation accepts it with
the given batch sizes. Context parallelism is tried at the sizes `--context-parallel-sizes` lists
(default: none, CP 1); for sequences past the preset's length give `--max-position-embeddings`. Layouts that fit come first, fastest first. The estimates and their
assumptions are in megatron_mellama/parallel/memory_model.py; `--trace` also runs the dry run
(`pretrain --dry-run`) of each layout shown and prints the traced peak beside the estimate.
"""

from __future__ import annotations

import json

from megatron_mellama.config import PRESETS, ConfigError, parse_config
from megatron_mellama.parallel.memory_model import GIB, estimate
from megatron_mellama.tools.cli import OneLineParser, UsageError, run_tool

PROG = "mellama-plan-layout"
COLUMNS = (("TP", "tp", "d"), ("PP", "pp", "d"), ("DP", "dp", "d"), ("CP", "cp", "d"), ("micro", "microbatches", "d"),
           ("weights", "weights_gb", ".1f"), ("grads", "grads_gb", ".1f"), ("optim", "optimizer_gb", ".1f"),
           ("gathered", "gathered_gb", ".1f"), ("activ", "activations_gb", ".1f"), ("temp", "temporaries_gb", ".1f"),
           ("total GiB", "total_gb", ".1f"), ("fits", "fits", ""), ("step s", "step_s", ".2f"))
TRACED = ("traced GiB", "traced_gb", ".1f")


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", required=True, choices=sorted(PRESETS), help="model preset")
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument("--micro-batch-size", type=int, required=True)
    p.add_argument("--global-batch-size", type=int, required=True)
    p.add_argument("--num-gpus", type=int, required=True)
    p.add_argument("--gpu-memory-gb", type=float, required=True, help="memory of one GPU, GiB")
    p.add_argument("--peak-tflops", type=float, default=312.0, help="dense bf16 peak of one GPU (default: A100, 312)")
    p.add_argument("--efficiency", type=float, default=0.45, help="assumed fraction of peak reached (default 0.45)")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default="selective",
                   help="activation recomputation (default: selective)")
    p.add_argument("--data-parallel-sharding", choices=("none", "optimizer", "full"), default="optimizer",
                   help="as the training flag (default: optimizer)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="compute precision (default: bf16, with fp32 master weights)")
    p.add_argument("--context-parallel-sizes", type=int, nargs="+", default=[1], metavar="CP",
                   help="context-parallel sizes to try (default: 1, no context parallelism)")
    p.add_argument("--max-position-embeddings", type=int, default=None,
                   help="longest sequence the rotary tables cover (default: the preset's)")
    p.add_argument("--rotary-base", type=float, default=None, help="RoPE base (default: the preset's)")
    p.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved 1F1B with this many layers per virtual stage, where PP > 1 allows it")
    p.add_argument("--trace", action="store_true",
                   help="also trace each layout shown with the dry run (about 10-60 s each) and print the traced "
                        "peak of its heaviest rank")
    p.add_argument("--top", type=int, default=10, help="show the best N layouts (0: all; default 10)")
    p.add_argument("--json", action="store_true", help="print the layouts as a JSON list")
    return p


def _check(args) -> None:
    for flag in ("num_gpus", "gpu_memory_gb", "peak_tflops", "micro_batch_size", "global_batch_size",
                 "seq_length"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if not 0 < args.efficiency <= 1:
        raise UsageError(f"--efficiency must lie in (0, 1], got {args.efficiency}")
    if args.top < 0:
        raise UsageError(f"--top must not be negative, got {args.top}")
    if any(cp <= 0 for cp in args.context_parallel_sizes):
        raise UsageError(f"--context-parallel-sizes must be positive, got {args.context_parallel_sizes}")


def _config(args, tp: int, pp: int, world: int, cp: int = 1):
    argv = ["--model", args.model, "--seq-length", str(args.seq_length),
            "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size),
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--context-parallel-size", str(cp), "--data-parallel-sharding", args.data_parallel_sharding,
            "--mock-data", "--train-iters", "1"]  # what a traced step needs; the estimates ignore them
    if args.max_position_embeddings:
        argv += ["--max-position-embeddings", str(args.max_position_embeddings)]
    if args.rotary_base:
        argv += ["--rotary-base", str(args.rotary_base)]
    if args.dtype != "fp32":
        argv.append(f"--{args.dtype}")
    if args.num_layers_per_virtual_pipeline_stage and pp > 1:
        argv += ["--num-layers-per-virtual-pipeline-stage", str(args.num_layers_per_virtual_pipeline_stage)]
    if tp > 1:
        argv.append("--sequence-parallel")  # the activation figures assume it
    if args.recompute != "none":
        argv += ["--recompute-granularity", args.recompute]
    return parse_config(argv, world_size=world)


def plan(args) -> list[dict]:
    """Every valid layout's estimate (as dicts, with its config under "cfg"), best first."""
    try:  # model, sequence and batch flags on their own, so their errors are not lost among layouts
        base = _config(args, 1, 1, 1)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    m = base.model
    rows = []
    for tp, pp, cp in _candidates(m.num_layers, args.num_gpus, sorted(set(args.context_parallel_sizes))):
        try:
            cfg = _config(args, tp, pp, args.num_gpus, cp)
        except ConfigError:
            continue
        row = estimate(cfg, gpu_memory_gb=args.gpu_memory_gb, peak_tflops=args.peak_tflops,
                       efficiency=args.efficiency).as_dict()
        rows.append(dict(row, cfg=cfg))
    if not rows:
        raise UsageError(f"--num-gpus {args.num_gpus}: no TP x PP x DP layout of {args.model} is valid with "
                         f"--global-batch-size {args.global_batch_size} and --micro-batch-size "
                         f"{args.micro_batch_size}")
    rows.sort(key=lambda r: (not r["fits"], r["step_s"], r["total_gb"]))
    return rows


def _candidates(layers: int, gpus: int, cp_sizes: list[int]):
    """(TP, PP, CP) with TP a power of two up to a node, PP dividing the layers, and all three the GPUs."""
    for tp in (1, 2, 4, 8):
        for pp in range(1, layers + 1):
            for cp in cp_sizes:
                if layers % pp == 0 and gpus % (tp * pp * cp) == 0:
                    yield tp, pp, cp


def trace(rows: list[dict]) -> None:
    """Add each row's traced peak (its heaviest traced rank), from the dry run."""
    from megatron_mellama.training.dry_run import dry_run

    for i, row in enumerate(rows):
        cp = f" x CP {row['cp']}" if row["cp"] > 1 else ""
        print(f"tracing layout {i + 1} of {len(rows)}: TP {row['tp']} x PP {row['pp']} x DP {row['dp']}{cp} ...",
              flush=True)
        row["traced_gb"] = max(t.peak.total for t in dry_run(row["cfg"], progress=lambda line: None)) / GIB


def format_table(rows: list[dict]) -> str:
    columns = COLUMNS + ((TRACED,) if rows and "traced_gb" in rows[0] else ())
    if all(r.get("cp", 1) == 1 for r in rows):  # the table as before context parallelism
        columns = tuple(c for c in columns if c[1] != "cp")
    cells = [[h for h, _, _ in columns]]
    for r in rows:
        cells.append([("yes" if r[k] else "no") if k == "fits" else format(r[k], f) for _, k, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


def main(argv=None) -> int:
    return run_tool(PROG, lambda: build_parser().parse_args(argv), _run)


def _run(args) -> int:
    _check(args)
    rows = plan(args)
    if args.top:
        rows = rows[:args.top]
    if args.trace:
        trace(rows)
    for row in rows:
        del row["cfg"]
        if args.context_parallel_sizes == [1]:  # the JSON as before context parallelism
            del row["cp"]
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0
