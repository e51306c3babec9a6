"""The straggler report (`--log-straggler`): at the train log's iterations, every rank's own compute
time (its layers' training forward per layer call, `../straggler.py`) since the last report, and the
--straggler-minmax-count slowest and fastest ranks named with their host, device and ratio to the
median, on the console, in TensorBoard and in the JSON log.

Per report one all_gather of one float per rank, on the run's device, and one host read; the hosts
and devices are exchanged once, at start-up. Nothing per step: the timing hooks only record.
"""

from __future__ import annotations

import math
import socket
import statistics

import torch
import torch.distributed as dist

from ..console import print0
from ..metrics import MetricsLogger
from ..run_state import RunState
from ..straggler import LayerForwardTimer, layers_of

FLAG = "--log-straggler"


def rank_report(per_call_ms: list[float], hosts: list[str], devices: list[str], count: int) -> dict | None:
    """The median and the `count` slowest (slowest first) and fastest (fastest first) ranks of
    `per_call_ms` (one value per global rank; NaN for a rank without a layer call), each as
    {"rank", "host", "device", "ms", "ratio"} (its time over the median); None when no rank has one."""
    timed = [(ms, rank) for rank, ms in enumerate(per_call_ms) if math.isfinite(ms)]
    if not timed:
        return None
    median = statistics.median(ms for ms, _ in timed)
    count = min(count, len(timed))

    def entry(ms, rank):
        return dict(rank=rank, host=hosts[rank], device=devices[rank], ms=ms,
                    ratio=ms / median if median > 0 else 1.0)

    ordered = sorted(timed, key=lambda t: (-t[0], t[1]))
    return dict(median_ms=median, ranks=len(timed), slowest=[entry(*t) for t in ordered[:count]],
                fastest=[entry(*t) for t in reversed(ordered[-count:])])


def report_line(report: dict, first: int, last: int) -> str:
    def named(e):
        return f"rank {e['rank']} ({e['host']}, {e['device']}) {e['ms']:.3f} ms, {e['ratio']:.2f}x"

    span = f"iteration {last}" if first == last else f"iterations {first}-{last}"
    return (f" straggler report, {span}: layer forward per call, median {report['median_ms']:.3f} ms over "
            f"{report['ranks']} ranks | slowest: " + "; ".join(map(named, report["slowest"]))
            + " | fastest: " + "; ".join(map(named, report["fastest"])) + " |")


def report_scalars(report: dict) -> dict[str, float]:
    """TensorBoard's view: the median and the slowest and fastest rank with their ratios."""
    slowest, fastest = report["slowest"][0], report["fastest"][0]
    return {"straggler/median-layer-forward-ms": report["median_ms"],
            "straggler/slowest-ratio": slowest["ratio"], "straggler/slowest-rank": slowest["rank"],
            "straggler/fastest-ratio": fastest["ratio"], "straggler/fastest-rank": fastest["rank"]}


class StragglerReport:
    def __init__(self, cfg, engine, metrics: MetricsLogger, train_log):
        """`train_log`: the train log's job; the report is due at its iterations."""
        self.metrics, self.train_log, self.device = metrics, train_log, engine.device
        self.count = cfg.logging.straggler_minmax_count
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.enabled = cfg.logging.log_straggler
        if self.enabled and self.world == 1:
            print0(f"{FLAG}: a single rank, no other to compare with; no straggler report")
            self.enabled = False
        self.since = None  # the first iteration the next report covers
        if self.enabled:
            self.timer = LayerForwardTimer(layers_of(engine.modules), engine.device)
            # once, at start-up: the reports name ranks without a collective of strings
            names = [None] * self.world
            dist.all_gather_object(names, (socket.gethostname(), str(engine.device)))
            self.hosts, self.devices = [n[0] for n in names], [n[1] for n in names]

    def due(self, state: RunState) -> bool:
        return self.enabled and self.train_log.due(state)

    def run(self, state: RunState) -> None:
        # (after a spike rollback the iterations start again below `since`)
        first = state.start_iteration + 1 if self.since is None else min(self.since, state.iteration)
        self.since = state.iteration + 1
        mine = torch.tensor([self.timer.per_call_ms()], dtype=torch.float32, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
        if not self.metrics.is_writer:
            return
        report = rank_report(torch.cat(gathered).tolist(), self.hosts, self.devices, self.count)
        if report is None:  # no layer ran a training forward since the last report (skipped iterations)
            return
        self.metrics.log_report(state.iteration, state.consumed_samples, "straggler",
                                dict(first_iteration=first, **report), report_line(report, first, state.iteration),
                                report_scalars(report))
