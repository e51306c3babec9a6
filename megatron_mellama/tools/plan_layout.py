"""Rank every TP x PP x DP (x CP) layout of a run on a cluster by estimated memory per GPU and step time.

    mellama-plan-layout --config examples/me_llama/me_llama_13b.yaml --num-gpus 64 --gpu-memory-gb 80
    mellama-plan-layout --model llama2-13b --bf16 --sequence-parallel --data-parallel-sharding optimizer \\
        --recompute-granularity selective --micro-batch-size 1 --global-batch-size 1024 \\
        --num-gpus 160 --gpu-memory-gb 80

The run is described by pretrain's own flags and `--config` file, parsed by pretrain's parser with
pretrain's defaults, so every setting that changes memory (precision, micro-batch, sequence,
sharding, --reduce-grads-once-per-step, recompute, sequence parallel, virtual stages, ...) means
here what it means to training and to `pretrain --dry-run`. The planner replaces only the layout:
each candidate is the run's flags with `--tensor-model-parallel-size`, `--pipeline-model-parallel-size`
and `--context-parallel-size` set to it, over `--num-gpus` processes.

A layout is listed when TP is a power of two of at most 8 (one node), PP divides the layers, and
pretrain's config validation accepts the flags with it. Context parallelism is tried at the sizes
`--context-parallel-sizes` lists (default: the run's own, CP 1 unless set). Layouts that fit come
first, fastest first. The estimates and their assumptions are in megatron_mellama/parallel/memory_model.py;
`--trace` also runs the dry run of each layout shown and prints the traced peak beside the estimate.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from collections import Counter

from megatron_mellama.config import (PRESETS, ConfigError, build_parser as build_config_parser, read_given, resolve,
                                     validate)
from megatron_mellama.parallel.memory_model import GIB, estimate
from megatron_mellama.tools.cli import OneLineParser, UsageError, run_tool

PROG = "mellama-plan-layout"
COLUMNS = (("TP", "tp", "d"), ("PP", "pp", "d"), ("DP", "dp", "d"), ("CP", "cp", "d"), ("micro", "microbatches", "d"),
           ("weights", "weights_gb", ".1f"), ("grads", "grads_gb", ".1f"), ("optim", "optimizer_gb", ".1f"),
           ("gathered", "gathered_gb", ".1f"), ("activ", "activations_gb", ".1f"), ("temp", "temporaries_gb", ".1f"),
           ("total GiB", "total_gb", ".1f"), ("fits", "fits", ""), ("step s", "step_s", ".2f"))
TRACED = ("traced GiB", "traced_gb", ".1f")
LAYOUT_FLAGS = ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--context-parallel-size")
# the planner's own flags of earlier releases, now pretrain's
RENAMED = {"--recompute": "--recompute-granularity full|selective (leave it out for none)",
           "--dtype": "--bf16 or --fp16 (neither for fp32)"}


def _add_planning_flags(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """The planner's own flags; without `defaults` they only show in --help."""
    def default(value):
        return value if defaults else argparse.SUPPRESS

    g = p.add_argument_group("planning (the other flags describe the run, as pretrain's)")
    g.add_argument("--num-gpus", type=int, required=defaults, default=default(None), help="GPUs of the run")
    g.add_argument("--gpu-memory-gb", type=float, required=defaults, default=default(None),
                   help="memory of one GPU, GiB")
    g.add_argument("--peak-tflops", type=float, default=default(312.0),
                   help="dense bf16 peak of one GPU (default: A100, 312)")
    g.add_argument("--efficiency", type=float, default=default(0.45),
                   help="assumed fraction of peak reached (default 0.45)")
    g.add_argument("--context-parallel-sizes", type=int, nargs="+", default=default(None), metavar="CP",
                   help="context-parallel sizes to try (default: the run's --context-parallel-size, 1 unless set)")
    g.add_argument("--trace", action="store_true", default=default(False),
                   help="also trace each layout shown with the dry run (about 10-60 s each) and print the traced "
                        "peak of its heaviest rank")
    g.add_argument("--top", type=int, default=default(10), help="show the best N layouts (0: all; default 10)")
    g.add_argument("--json", action="store_true", default=default(False), help="print the layouts as a JSON list")


def build_parser() -> argparse.ArgumentParser:
    """pretrain's parser (what `--help` lists and the run's flags are parsed by), plus the planner's flags."""
    p = build_config_parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.usage = "%(prog)s --num-gpus N --gpu-memory-gb GIB [--config FILE.yaml] [--model PRESET] [flags]"
    _add_planning_flags(p, defaults=False)
    return p


def split_args(argv) -> tuple[argparse.Namespace, list[str]]:
    """(the planner's flags, the run's flags for pretrain's parser)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        build_parser().parse_args(["--help"])
    planning = OneLineParser(prog=PROG, add_help=False, allow_abbrev=False)
    _add_planning_flags(planning)
    args, run = planning.parse_known_args(argv)
    for flag, instead in RENAMED.items():
        if any(a == flag or a.startswith(flag + "=") for a in run):
            raise UsageError(f"{flag} is pretrain's {instead}: the planner takes pretrain's flags")
    for flag in LAYOUT_FLAGS:
        if any(a == flag or a.startswith(flag + "=") for a in run):
            raise UsageError(f"{flag}: the planner tries every layout (narrow CP with --context-parallel-sizes)")
    return args, run


def _check(args) -> None:
    for flag in ("num_gpus", "gpu_memory_gb", "peak_tflops"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value > 0):  # nan passes `> 0` checks the wrong way round
            raise UsageError(f"--{flag.replace('_', '-')} must be a positive finite number, got {value}")
    if not (math.isfinite(args.efficiency) and 0 < args.efficiency <= 1):
        raise UsageError(f"--efficiency must lie in (0, 1], got {args.efficiency}")
    if args.top < 0:
        raise UsageError(f"--top must not be negative, got {args.top}")
    if args.context_parallel_sizes is not None and any(cp <= 0 for cp in args.context_parallel_sizes):
        raise UsageError(f"--context-parallel-sizes must be positive, got {args.context_parallel_sizes}")


def layout_config(given: dict, tp: int, pp: int, cp: int, world: int):
    """The Config pretrain would build from the run's `given` settings with this layout over `world` processes."""
    layout = dict(zip(("parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
                       "parallel.context_parallel_size"), (tp, pp, cp)))
    cfg, _ = resolve(dict(given, **layout), world_size=world)
    validate(cfg)
    return cfg


def plan(args, run: list[str]) -> list[dict]:
    """Every valid layout's estimate (as dicts, with its config under "cfg"), best first."""
    # the run's flags and `--config` file as pretrain reads them: flag errors surface here, once
    given = read_given(run, build_parser())
    cp_sizes = sorted(set(args.context_parallel_sizes or [given.get("parallel.context_parallel_size", 1)]))
    layers = _num_layers(given)
    rows, refusals = [], {cp: Counter() for cp in cp_sizes}
    for cp in cp_sizes:
        if args.num_gpus % cp:
            refusals[cp][f"CP {cp} does not divide --num-gpus {args.num_gpus}"] += 1
    for tp, pp, cp in _candidates(layers, args.num_gpus, cp_sizes):
        try:
            cfg = layout_config(given, tp, pp, cp, args.num_gpus)
        except ConfigError as e:
            refusals[cp][str(e)] += 1
            continue
        row = estimate(cfg, gpu_memory_gb=args.gpu_memory_gb, peak_tflops=args.peak_tflops,
                       efficiency=args.efficiency).as_dict()
        rows.append(dict(row, cfg=cfg))
    unplanned = {cp: refusals[cp].most_common(1)[0][0] for cp in cp_sizes
                 if refusals[cp] and not any(r["cp"] == cp for r in rows)}
    if not rows:
        where = f"--num-gpus {args.num_gpus}: no TP x PP x DP layout is valid"
        if cp_sizes == [1]:
            raise UsageError(f"{where}: {unplanned[1]}")
        raise UsageError(f"{where} at --context-parallel-sizes {' '.join(map(str, cp_sizes))}: "
                         + "; ".join(f"CP {cp}: {why}" for cp, why in unplanned.items()))
    for cp, why in unplanned.items():
        print(f"{PROG}: note: --context-parallel-sizes {cp}: no valid layout ({why})", file=sys.stderr)
    rows.sort(key=lambda r: (not r["fits"], r["step_s"], r["total_gb"]))
    return rows


def _num_layers(given: dict) -> int:
    """The run's decoder layers, from its flags, file or preset (what the PP candidates divide)."""
    layers = given.get("model.num_layers", PRESETS.get(given.get("preset"), {}).get("num_layers"))
    if layers is None:
        raise UsageError("--num-layers is required (or choose a preset with --model)")
    if layers <= 0:
        raise UsageError(f"--num-layers must be positive, got {layers}")
    return layers


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
        traces = dry_run(_with_run_length(row["cfg"]), progress=lambda line: None)
        row["traced_gb"] = max(t.peak.total for t in traces) / GIB


def _with_run_length(cfg):
    """`cfg`, with one iteration to train when it names no run length: the traced step builds the
    learning-rate schedule, which needs one, and the memory does not depend on it."""
    t, o = cfg.train, cfg.optim
    if any(v is not None for v in (t.train_iters, t.train_samples, o.lr_decay_iters, o.lr_decay_samples)):
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.train.train_iters = 1
    return cfg


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
    return run_tool(PROG, lambda: split_args(argv), _run, errors=(ConfigError,))


def _run(parsed) -> int:
    args, run = parsed
    _check(args)
    rows = plan(args, run)
    with_cp = any(r["cp"] > 1 for r in rows)
    if args.top:
        rows = rows[:args.top]
    if args.trace:
        trace(rows)
    for row in rows:
        del row["cfg"]
        if not with_cp:  # the JSON as before context parallelism
            del row["cp"]
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0
