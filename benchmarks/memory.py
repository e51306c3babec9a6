"""Peak memory per GPU of the Me-LLaMA layouts: the planner's prediction beside the dry run's trace.

    python benchmarks/memory.py                 # every layout below (about 10 minutes on 2 cores)
    python benchmarks/memory.py --only 13b      # the layouts whose name contains "13b"
    python benchmarks/memory.py --json out.json

For each layout the dry run (`pretrain --dry-run`: the real model of one rank, fake process group,
fake tensors, one optimizer step) traces the peak of live tensor memory of rank 0 and of the first
rank of the last pipeline stage; the planner (`parallel/memory_model.py`) predicts the same ranks.
Printed: both peaks in GiB, the ratio planner / trace, and the largest parts of the trace.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_mellama.config import parse_config  # noqa: E402
from megatron_mellama.parallel.memory_model import predict_rank  # noqa: E402
from megatron_mellama.training.dry_run import dry_run  # noqa: E402
from megatron_mellama.training.memory_trace import GIB  # noqa: E402

_EVERY = ["--no-reduce-grads-once-per-step"]  # ZeRO-2 reduce-scatters every micro-batch (not the default)
_13B = ["--model", "llama2-13b", "--tensor-model-parallel-size", "4", "--sequence-parallel",
        "--data-parallel-sharding", "optimizer", "--global-batch-size", "1024"]
_70B = ["--model", "llama2-70b", "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "4",
        "--sequence-parallel", "--data-parallel-sharding", "optimizer", "--global-batch-size", "1024",
        "--micro-batch-size", "1"]
_INTERLEAVED = ["--num-layers-per-virtual-pipeline-stage", "10"]

# name -> (GPUs, flags); every run is bf16 at LLaMA2's 4096 tokens; ZeRO-2 ("zero2") reduces the
# gradients once per step ("once", the default and the recipes') or every micro-batch ("every")
LAYOUTS = {
    "7b tp1 dp8 ddp": (8, ["--model", "llama2-7b", "--global-batch-size", "64", "--data-parallel-sharding", "none"]),
    "7b tp1 dp8 zero2 every": (8, ["--model", "llama2-7b", "--global-batch-size", "64",
                                   "--data-parallel-sharding", "optimizer"] + _EVERY),
    "7b tp1 dp8 zero3": (8, ["--model", "llama2-7b", "--global-batch-size", "64", "--data-parallel-sharding", "full"]),
    "13b tp4 sp zero2 dp16 mb1 every": (64, _13B + ["--micro-batch-size", "1"] + _EVERY),
    "13b tp4 sp zero2 dp16 mb2 every": (64, _13B + ["--micro-batch-size", "2"] + _EVERY),
    # examples/me_llama/me_llama_13b.yaml
    "13b tp4 sp zero2 dp16 mb2 once": (64, _13B + ["--micro-batch-size", "2", "--reduce-grads-once-per-step"]),
    "70b tp8 pp4 dp4 1f1b every": (128, _70B + _EVERY),
    "70b tp8 pp4 dp4 1f1b selective every": (128, _70B + _EVERY + ["--recompute-granularity", "selective"]),
    "70b tp8 pp4 dp4 1f1b full every": (128, _70B + _EVERY + ["--recompute-granularity", "full"]),
    # examples/me_llama/me_llama_70b.yaml
    "70b tp8 pp4 dp4 1f1b once": (128, _70B + ["--reduce-grads-once-per-step"]),
    "70b tp8 pp4 dp4 interleaved every": (128, _70B + _EVERY + _INTERLEAVED),
    "70b tp8 pp4 dp4 interleaved selective every": (128, _70B + _EVERY + _INTERLEAVED
                                                    + ["--recompute-granularity", "selective"]),
    "70b tp8 pp4 dp4 interleaved full every": (128, _70B + _EVERY + _INTERLEAVED + ["--recompute-granularity", "full"]),
}


def config(gpus: int, flags: list[str], extra: list[str]):
    return parse_config(flags + ["--bf16", "--seq-length", "4096", "--mock-data", "--train-iters", "1"] + extra,
                        world_size=gpus)


def compare(name: str, gpus: int, flags: list[str], extra: list[str]) -> list[dict]:
    cfg = config(gpus, flags, extra)
    rows = []
    for trace in dry_run(cfg, progress=lambda line: None):
        predicted = predict_rank(cfg, trace.rank)
        rows.append(dict(layout=name, rank=trace.rank, stage=trace.coordinates["pp"],
                         traced_gib=trace.peak.total / GIB, planned_gib=predicted.total_bytes / GIB,
                         ratio=predicted.total_bytes / trace.peak.total,
                         traced_parts={k: v / GIB for k, v in trace.peak.by_kind.items()},
                         planned_parts={k: v / GIB for k, v in predicted.parts.items()},
                         trace_seconds=trace.seconds))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="run only the layouts whose name contains this")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("extra", nargs="*", help="flags added to every layout (after --)")
    args = p.parse_args(argv)
    rows = []
    print(f"{'layout':40s} {'rank':>4s} {'traced GiB':>10s} {'planned GiB':>11s} {'ratio':>6s}  largest traced parts")
    for name, (gpus, flags) in LAYOUTS.items():
        if args.only and args.only not in name:
            continue
        for row in compare(name, gpus, flags, args.extra):
            parts = sorted(row["traced_parts"].items(), key=lambda kv: -kv[1])[:3]
            print(f"{name:40s} {row['rank']:4d} {row['traced_gib']:10.1f} {row['planned_gib']:11.1f} "
                  f"{row['ratio']:6.2f}  " + ", ".join(f"{k} {v:.1f}" for k, v in parts), flush=True)
            rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    worst = max(abs(r["ratio"] - 1) for r in rows) if rows else 0
    print(f"largest planner error: {100 * worst:.1f}% of the trace")
    return 0


if __name__ == "__main__":
    sys.exit(main())
