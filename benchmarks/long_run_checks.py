"""What the long-run checks and the watching flags cost per step: the same job with every one off,
then with each one on, then all of a group on, alternating rounds, in one run.

    python benchmarks/long_run_checks.py                    # 2 gloo processes, hidden 256, 4 layers
    python benchmarks/long_run_checks.py --rounds 3 --iters 120 --group long-runs

The checks: the hang watchdog (`--distributed-timeout-seconds-after-init`), the straggler report
(`--log-straggler`), spike detection (`--check-for-spiky-loss`) and the replica check
(`--check-weight-hash-across-dp-replicas-interval`); then manual garbage collection (`--manual-gc`,
alone and collecting every 10 iterations), which is no check: its cost is the collections'. What
users watch (`--group watching`): W&B offline, the profiler tracing two iterations, the parameters'
norm, the zero-gradient count, throughput, the training loss per domain, the timers at level 2.
Each configuration runs the same torchrun job (DP 2, replicated weights, gloo on the CPU, mock data) and the figure is the
median of its logged per-interval iteration times, the first interval (warm-up) left out; the ratio
is against the checks-off job of the same round, and the table gives the median ratio over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPLICA_INTERVAL = 10
GC_INTERVAL = 10

CHECKS = {
    "hang watchdog": ["--distributed-timeout-seconds-after-init", "120"],
    "straggler report": ["--log-straggler"],
    "spike detection": ["--check-for-spiky-loss"],
    "replica check": ["--check-weight-hash-across-dp-replicas-interval", str(REPLICA_INTERVAL)],
}
# what users watch (the per-step cost of each, same run): W&B offline, the profiler tracing two
# iterations, the health metrics, the timers
WATCHING = {
    "wandb (offline)": ["--wandb-project", "bench", "--wandb-save-dir", "{workdir}/wandb"],
    "profile 2 iters": ["--profile", "--profile-step-start", "50", "--profile-step-end", "51",
                        "--profile-dir", "{workdir}/profile"],
    "params norm": ["--log-params-norm"],
    "num zeros": ["--log-num-zeros-in-grad"],
    "throughput": ["--log-throughput"],
    "loss per domain": ["--log-loss-per-domain"],
    "timers level 2": ["--timing-log-level", "2"],
}
# not checks: where Python's collections happen; their cost is the collections' own
GC = {
    "manual gc": ["--manual-gc"],
    f"manual gc, {GC_INTERVAL}": ["--manual-gc", "--manual-gc-interval", str(GC_INTERVAL)],
}


def job(args, extra: list[str], workdir: Path) -> float:
    """The median per-interval iteration time (s) of one job, without its first interval."""
    log = workdir / "metrics.jsonl"
    log.unlink(missing_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               "-m", "megatron_mellama.pretrain", "--num-layers", str(args.layers), "--hidden-size",
               str(args.hidden), "--num-attention-heads", "4", "--ffn-hidden-size", str(args.hidden * 8 // 3),
               "--seq-length", str(args.seq_length), "--max-position-embeddings", str(args.seq_length),
               "--vocab-size", "1024", "--mock-data", "--micro-batch-size", "2", "--global-batch-size",
               str(2 * args.nproc), "--train-iters", str(args.iters), "--lr", "1e-4", "--log-interval",
               str(args.log_interval), "--eval-iters", "0", "--num-workers", "0", "--log-file", str(log),
               "--save", str(workdir / "ckpt"), "--save-interval", str(10 * args.iters),
               *(flag.format(workdir=workdir) for flag in extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), WANDB_MODE="offline")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=workdir)
    if proc.returncode != 0:
        raise SystemExit(f"the job with {' '.join(extra) or 'no checks'} failed:\n{proc.stderr[-3000:]}")
    times = [r["iteration_time_s"] for r in map(json.loads, log.read_text().splitlines())
             if "iteration_time_s" in r and r["iteration"] % args.log_interval == 0]
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2, help="processes (gloo, CPU)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--iters", type=int, default=100, help="iterations per job")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every configuration, alternating")
    parser.add_argument("--group", choices=("long-runs", "watching", "all"), default="all",
                        help="the long-run checks (hangs, stragglers, spikes, replicas, gc), what users "
                             "watch (W&B, profiler, health metrics, timers), or both")
    args = parser.parse_args()

    configs = {"all off": []}
    if args.group in ("long-runs", "all"):
        configs.update(CHECKS)
        configs["all checks on"] = [flag for flags in CHECKS.values() for flag in flags]
        configs.update(GC)
    if args.group in ("watching", "all"):
        configs.update(WATCHING)
        configs["all watching on"] = [flag for flags in WATCHING.values() for flag in flags]
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    ratios: dict[str, list[float]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        # a first job not counted: the page cache and the compiled helpers are then warm for every job
        (Path(tmp) / "warm-up").mkdir()
        job(args, [], Path(tmp) / "warm-up")
        for round_ in range(args.rounds):
            for name, extra in configs.items():
                workdir = Path(tmp) / f"{round_}-{name.replace(' ', '_').replace(',', '')}"
                workdir.mkdir()
                seconds[name].append(job(args, extra, workdir))
                print(f"round {round_ + 1}/{args.rounds}: {name:17s} {seconds[name][-1] * 1000:8.1f} ms/iteration",
                      flush=True)
            for name in configs:
                ratios[name].append(seconds[name][-1] / seconds["all off"][-1])
    print(f"\n{args.nproc} processes, hidden {args.hidden}, {args.layers} layers, seq {args.seq_length}, "
          f"{args.iters} iterations per job, median of {args.rounds} rounds")
    print(f"{'checks':17s} {'ms/iteration':>13s} {'vs all off':>11s}")
    for name in configs:
        print(f"{name:17s} {statistics.median(seconds[name]) * 1000:13.1f} {statistics.median(ratios[name]):10.3f}x")
    off = statistics.median(seconds["all off"])
    # what one replica check and one collection cost, from the iterations they are spread over
    for name, every in (("replica check", REPLICA_INTERVAL), (f"manual gc, {GC_INTERVAL}", GC_INTERVAL)):
        if name not in seconds:
            continue
        print(f"{name}: about {(statistics.median(seconds[name]) - off) * every * 1000:.0f} ms each "
              f"(every {every} iterations)")


if __name__ == "__main__":
    main()
