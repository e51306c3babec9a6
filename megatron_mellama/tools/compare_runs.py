"""Compare two runs metric by metric over their common iterations: a table of the largest absolute
and relative differences, an exit code for CI, and a PNG overlaying their curves.

    mellama-compare-runs runs/base/metrics.jsonl runs/resumed/metrics.jsonl
    mellama-compare-runs runs/base/tb runs/new/tb --rtol 1e-3 --metrics "lm loss" "lm loss validation*"

A and B are runs' `--log-file` (JSON lines) or `--tensorboard-dir`, either form each. A is the
reference: a metric is within tolerance at an iteration when |A - B| <= atol + rtol * |A| (the rule
of numpy.isclose); NaN matches only NaN (the same skipped step). The defaults, 0 and 0, ask for the
same numbers, as a run and its resumption from a checkpoint give. Between a JSON log and a
TensorBoard folder the values are compared as float32, which is what TensorBoard holds.

Checked unless `--metrics` says otherwise: what training computes (`lm loss`, the validation
losses, `learning-rate`, `grad-norm`, downstream accuracy, each domain's consumed samples). What
the machine measures (throughput, memory, time) differs from one run to the next: it is listed,
unchecked, unless `--metrics` names it.

Exit 0 when every checked metric is within tolerance at every common iteration; 1 when one is not
or only one run has it (each named, with the first iteration that differs); 2 for bad input: a path
that is not a run (its line named), runs without a common iteration, a --metrics name neither run has.
The image goes to `--output`, by default compare_runs.png in the folder that holds A.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import os
from dataclasses import dataclass

import numpy

from megatron_mellama.tools.cli import OneLineParser, UsageError, run_tool
from megatron_mellama.tools.plot_run import checked_output, draw_runs, run_label
from megatron_mellama.tools.run_logs import Run, RunLogError, read_run

PROG = "mellama-compare-runs"
DEFAULT_IMAGE = "compare_runs.png"
CHECKED_BY_DEFAULT = ("lm loss", "lm loss/*", "lm loss validation", "lm loss validation/*",
                      "lm loss validation ppl*", "learning-rate", "grad-norm", "params-norm", "num-zeros", "downstream/*",
                      "consumed samples/*")


@dataclass
class MetricDiff:
    metric: str
    checked: bool
    iterations: int = 0
    max_abs: float = 0.0
    max_abs_at: int | None = None
    max_rel: float = 0.0
    max_rel_at: int | None = None
    first_outside: tuple[int, float, float] | None = None  # (iteration, A, B)
    only_in: str | None = None  # "A" or "B" when the other run lacks the metric

    @property
    def failed(self) -> bool:
        return self.checked and (self.first_outside is not None or self.only_in is not None)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("a", metavar="A", help="the reference run: its --log-file or --tensorboard-dir")
    p.add_argument("b", metavar="B", help="the run compared with it, in either form")
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance, of |A| (default 0)")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0)")
    p.add_argument("--metrics", nargs="+", metavar="METRIC",
                   help="the metrics checked: TensorBoard tags or fnmatch patterns, e.g. 'lm loss' "
                        f"'lm loss validation/*' (default: {' '.join(repr(m) for m in CHECKED_BY_DEFAULT)})")
    p.add_argument("--output", metavar="FILE.png", help=f"the image (default: {DEFAULT_IMAGE} in A's folder)")
    p.add_argument("--no-plot", action="store_true", help="print the table and exit; no image")
    return p


def compare(a: Run, b: Run, rtol: float, atol: float, checked_patterns) -> list[MetricDiff]:
    """One MetricDiff per metric of either run, checked ones first."""
    as_float32 = a.form != b.form
    diffs = []
    for metric in sorted(set(a.metrics) | set(b.metrics)):
        diff = MetricDiff(metric, any(fnmatch.fnmatchcase(metric, p) for p in checked_patterns))
        if metric not in a.metrics or metric not in b.metrics:
            diff.only_in = "A" if metric in a.metrics else "B"
        else:
            _measure(diff, a.metrics[metric], b.metrics[metric], rtol, atol, as_float32)
        diffs.append(diff)
    order = {pattern: i for i, pattern in enumerate(CHECKED_BY_DEFAULT)}

    def rank(diff):
        first = next((i for p, i in order.items() if fnmatch.fnmatchcase(diff.metric, p)), len(order))
        return not diff.checked, diff.only_in is not None, first, diff.metric

    return sorted(diffs, key=rank)


def _measure(diff: MetricDiff, a: dict, b: dict, rtol: float, atol: float, as_float32: bool) -> None:
    for iteration in sorted(set(a) & set(b)):
        x, y = a[iteration], b[iteration]
        if as_float32:
            x, y = float(numpy.float32(x)), float(numpy.float32(y))
        absolute, relative = difference(x, y)
        diff.iterations += 1
        if absolute > diff.max_abs or diff.max_abs_at is None:
            diff.max_abs, diff.max_abs_at = absolute, iteration
        if relative > diff.max_rel or diff.max_rel_at is None:
            diff.max_rel, diff.max_rel_at = relative, iteration
        if diff.first_outside is None and not absolute <= atol + rtol * abs(x):
            diff.first_outside = (iteration, x, y)


def difference(x: float, y: float) -> tuple[float, float]:
    """(|x - y|, |x - y| / |x|); a NaN facing a number, or a change from 0, is infinitely far."""
    if x == y or (math.isnan(x) and math.isnan(y)):
        return 0.0, 0.0
    absolute = abs(x - y)
    if math.isnan(absolute):
        return math.inf, math.inf
    return absolute, absolute / abs(x) if x else math.inf


def selected_patterns(names, a: Run, b: Run) -> tuple[str, ...]:
    if names is None:
        return CHECKED_BY_DEFAULT
    known = set(a.metrics) | set(b.metrics)
    for name in names:
        if not any(fnmatch.fnmatchcase(metric, name) for metric in known):
            raise UsageError(f"--metrics {name!r}: neither run has it (they have: {', '.join(sorted(known))})")
    return tuple(names)


def table(diffs: list[MetricDiff]) -> str:
    head = ("metric", "iterations", "max |A-B|", "at", "max |A-B|/|A|", "at", "result")
    rows = [head] + [_row(d) for d in diffs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) if i == 0 or i == len(head) - 1 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _row(d: MetricDiff) -> tuple[str, ...]:
    if d.only_in:
        return (d.metric, "-", "-", "-", "-", "-", f"only in {d.only_in}" + (" DIFFERS" if d.checked else ""))
    if not d.iterations:
        return (d.metric, "0", "-", "-", "-", "-", "no common iteration")
    result = ("DIFFERS" if d.first_outside else "ok") if d.checked else "unchecked"
    return (d.metric, str(d.iterations), f"{d.max_abs:.3e}", str(d.max_abs_at) if d.max_abs else "-",
            f"{d.max_rel:.3e}", str(d.max_rel_at) if d.max_rel else "-", result)


def verdict(diffs: list[MetricDiff], rtol: float, atol: float) -> str:
    failed = [d for d in diffs if d.failed]
    tolerance = f"--rtol {rtol:g} --atol {atol:g}"
    if not failed:
        checked = sum(d.checked and d.iterations > 0 for d in diffs)
        return f"PASS: {_count(checked, 'checked metric')} within {tolerance}"
    reasons = []
    for d in failed:
        if d.only_in:
            reasons.append(f"{d.metric} (only in {d.only_in})")
        else:
            iteration, x, y = d.first_outside
            reasons.append(f"{d.metric} (from iteration {iteration}: {x:.6g} vs {y:.6g})")
    verb = "differs" if len(failed) == 1 else "differ"
    return f"FAIL: {_count(len(failed), 'metric')} {verb} beyond {tolerance}: " + "; ".join(reasons)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def common_iterations_line(a: Run, b: Run) -> str:
    common = sorted(set(a.iterations) & set(b.iterations))
    if not common:
        raise RunLogError(f"{a.path} (iterations {_span(a.iterations)}) and {b.path} (iterations "
                          f"{_span(b.iterations)}) have no common iteration")
    return (f"A: {a.path} ({a.form})\nB: {b.path} ({b.form})\ncommon iterations: {len(common)} "
            f"({_span(common)}; A has {len(a.iterations)}, B has {len(b.iterations)})")


def _span(iterations: list[int]) -> str:
    return f"{iterations[0]}-{iterations[-1]}" if iterations else "none"


def default_output(a_path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(a_path.rstrip("/\\") or a_path)), DEFAULT_IMAGE)


def _compare(args) -> int:
    output = None if args.no_plot else args.output and checked_output(args.output)
    if args.rtol < 0 or args.atol < 0:
        raise UsageError("--rtol and --atol are at least 0")
    a, b = read_run(args.a), read_run(args.b)
    print(common_iterations_line(a, b))
    diffs = compare(a, b, args.rtol, args.atol, selected_patterns(args.metrics, a, b))
    print(table(diffs))
    print(verdict(diffs, args.rtol, args.atol))
    if not args.no_plot:
        title = f"solid, filled markers: A = {run_label(a)}\ndashed, hollow markers: B = {run_label(b)}"
        print(f"image: {draw_runs([a, b], output or default_output(args.a), title)}")
    return 1 if any(d.failed for d in diffs) else 0


def main(argv=None) -> int:
    return run_tool(PROG, lambda: build_parser().parse_args(argv), _compare, errors=(RunLogError,))
