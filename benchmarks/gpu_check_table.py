"""Helpers of benchmarks/gpu_check.sh: the resume comparison and the closing table.

    python benchmarks/gpu_check_table.py resume A.jsonl B.jsonl --save-iteration 10 --last 20
    python benchmarks/gpu_check_table.py table LOG_DIR [--mode gpu|cpu]

`resume` compares the JSON-lines logs of an uninterrupted run (A) and of a run stopped at
--save-iteration and resumed from its checkpoint (B). `table` reads LOG_DIR/steps.tsv (one line per
step: name, exit status, seconds, time limit) and each step's LOG_DIR/NAME.log, and prints one row
per step with its key figure; it exits 1 when any step failed.

Figures are read from the benchmarks' printed lines; a line that is not there (the benchmark
changed, or stopped early) shows as "see log" rather than failing the table.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

SEE_LOG = "see log"


# ---------------------------------------------------------------- resume comparison

def read_train_records(path: Path) -> list[dict]:
    """Training records in file order; evaluation records (an "eval" key) are skipped."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        record = json.loads(line)
        if "eval" not in record:
            records.append(record)
    return records


def _diff(a, b) -> float:
    # the log writes non-finite values as null: two nulls agree, a null against a number does not
    if a is None or b is None:
        return 0.0 if a is b else math.inf
    return abs(float(a) - float(b))


def _rel(a, b) -> float:
    d = _diff(a, b)
    if d in (0.0, math.inf):
        return d
    return d / max(abs(float(a)), abs(float(b)))


def compare_resume(a_records: list[dict], b_records: list[dict], save_iteration: int, last: int,
                   rtol: float) -> tuple[bool, str]:
    """(passed, one line). Exact equality passes. When the two runs already differ before the save
    (the device is not bitwise reproducible, e.g. atomics in attention's backward), the resumed
    part cannot be exact either; it then passes within the relative tolerance `rtol`, and says so."""
    before = list(range(1, save_iteration + 1))
    after = list(range(save_iteration + 1, last + 1))
    a_iters = [r["iteration"] for r in a_records]
    b_iters = [r["iteration"] for r in b_records]
    if a_iters != before + after:
        return False, f"run A logged iterations {_span(a_iters)}, expected 1-{last} (use --log-interval 1)"
    # a resume that silently started from scratch would log 1.. again, and match A bit for bit
    if b_iters != before + after:
        return False, (f"run B logged iterations {_span(b_iters)}, expected 1-{save_iteration} then "
                       f"{save_iteration + 1}-{last} after the resume")
    a = {r["iteration"]: r for r in a_records}
    b = {r["iteration"]: r for r in b_records}

    def worst(iters, key, fn=_diff):
        return max(fn(a[i].get(key), b[i].get(key)) for i in iters)

    mismatched = [key for key in ("consumed_samples", "lr") if worst(after, key) != 0.0]
    loss, grad = worst(after, "lm_loss"), worst(after, "grad_norm")
    rel = max(worst(after, "lm_loss", _rel), worst(after, "grad_norm", _rel))
    noise = max(worst(before, "lm_loss"), worst(before, "grad_norm"))
    span = f"iterations {after[0]}-{after[-1]}"
    if mismatched:
        verb = "differs" if len(mismatched) == 1 else "differ"
        return False, f"{' and '.join(mismatched)} {verb} after the resume ({span}): not the same run"
    if loss == 0.0 and grad == 0.0:
        return True, f"exact: lm_loss and grad_norm equal at {span}"
    figures = f"max |diff| lm_loss {loss:.3g}, grad_norm {grad:.3g} at {span}"
    if noise == 0.0:
        return False, f"{figures}, yet the runs were equal before the save: resume not exact"
    ok = rel <= rtol
    return ok, (f"{figures} (rel. {rel:.2g}); not bitwise reproducible on this device (max |diff| "
                f"{noise:.3g} before the save), so {'within' if ok else 'ABOVE'} rtol {rtol:g}")


def kernel_choices(outputs: list[Path]) -> dict[str, str]:
    """{file name: the run's "kernels: ..." line}, for the outputs that have one."""
    picks = {}
    for path in outputs:
        text = path.read_text(errors="replace") if path.exists() else ""
        lines = [line.strip() for line in text.splitlines() if line.strip().startswith("kernels: ")]
        if lines:
            picks[path.stem] = lines[0][len("kernels: "):]
    return picks


def _span(iters: list[int]) -> str:
    if not iters:
        return "none"
    parts, start = [], iters[0]
    for prev, cur in zip(iters, iters[1:] + [None]):
        if cur != prev + 1:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = cur
    return ", ".join(parts)


# ---------------------------------------------------------------- figures per step

def _triton_tests(log: str, rc: int, mode: str) -> tuple[bool, str]:
    summary = None
    for line in log.splitlines():
        if re.search(r"\b(passed|failed|error|errors|skipped|no tests ran)\b.* in [\d.]+s", line):
            summary = line.strip("= ").strip()
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", summary or "")}
    passed = counts.get("passed", 0)
    bad = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    figure = re.sub(r" in [\d.]+s.*", "", summary) if summary else SEE_LOG
    if mode == "cpu":
        figure += " (Triton interpreter)"
    if "cannot be accessed from Triton (cpu tensor?)" in log:
        # what the tests need before they can run on a GPU: their tensors are made on the CPU
        figure += "; the tests make CPU tensors, so kernels cannot run without the interpreter"
    # pytest exits 0 when everything is skipped (Triton missing): that checked nothing
    return rc == 0 and passed > 0 and bad == 0, figure


def _kernels(log: str, rc: int, mode: str) -> tuple[bool, str]:
    checks, failures = [], []
    for line in log.splitlines():
        m = re.match(r"\s*(\w+)\s+(\w+):.*max rel\. difference\s+(\S+)\s+(ok|ABOVE TOLERANCE)", line)
        if m:
            checks.append((float(m.group(3)), m.group(1), m.group(2), m.group(4) == "ok"))
        m = re.match(r"\s*(\w+)\s+(\w+): failed \(", line)
        if m:
            failures.append(f"{m.group(1)}/{m.group(2)}")
    parts = []
    if checks:
        err, op, backend, _ = max(checks)
        above = [f"{o}/{b}" for _, o, b, ok in checks if not ok]
        parts.append(f"{len(checks)} checked, worst {err:.1e} ({op}/{backend})"
                     + (f", ABOVE TOLERANCE: {' '.join(above)}" if above else " ok"))
    else:
        above = []
    if failures:
        parts.append(f"failed: {' '.join(failures)}")
    m = re.search(r"engine auto:\s*([\d,]+) tokens/s.*?([\d.]+)x transformers", log)
    if m:
        parts.append(f"auto {m.group(2)}x transformers")
    return rc == 0 and not above and not failures, "; ".join(parts) or SEE_LOG


def _engine(log: str, rc: int, mode: str) -> tuple[bool, str]:
    parts = []
    m = re.search(r"^\s*engine:\s*([\d,]+) tokens/s(?:, ([\d,.]+) TFLOP/s, MFU ([\d.]+)%)?", log, re.M)
    if m:
        parts.append(f"{m.group(1)} tokens/s" + (f", MFU {m.group(3)}%" if m.group(3) else ""))
    m = re.search(r"ratio engine / transformers:\s*([\d.]+)x", log)
    if m:
        parts.append(f"{m.group(1)}x transformers")
    return rc == 0, ", ".join(parts) or SEE_LOG


def _resume(log: str, rc: int, mode: str) -> tuple[bool, str]:
    lines = [line[len("resume: "):] for line in log.splitlines() if line.startswith("resume: ")]
    return rc == 0, lines[-1] if lines else SEE_LOG


FIGURES = {"triton_tests": _triton_tests, "kernels": _kernels, "engine": _engine, "resume": _resume}


def judge(name: str, log: str, rc: int, limit: int, mode: str) -> tuple[bool, str]:
    reader = FIGURES.get(name)
    ok, figure = reader(log, rc, mode) if reader else (rc == 0, SEE_LOG)
    if rc in (124, 137):  # timeout's status, or SIGKILL after its grace period
        return False, f"timed out at {limit} s; {figure}"
    if rc != 0 and not figure.startswith("exit"):
        figure = f"exit {rc}; {figure}"
    return ok, figure


def environment(mode: str) -> str:
    try:
        import torch
    except Exception as exc:  # the table must still come out when torch itself is broken
        return f"torch does not import ({type(exc).__name__}: {exc})"
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "not importable"
    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        device = "no GPU"
    if mode == "cpu":
        device += ", CPU mode (tiny shapes)"
    return f"{device}; torch {torch.__version__}; triton {triton_version}"


def table(log_dir: Path, mode: str) -> int:
    rows, failed = [], 0
    steps = log_dir / "steps.tsv"
    for line in steps.read_text().splitlines() if steps.exists() else []:
        name, rc, seconds, limit = line.split("\t")
        log_path = log_dir / f"{name}.log"
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        try:
            ok, figure = judge(name, log, int(rc), int(limit), mode)
        except Exception as exc:  # a figure that cannot be read must not hide the others
            ok, figure = int(rc) == 0, f"{SEE_LOG} ({type(exc).__name__})"
        failed += not ok
        rows.append((name, "pass" if ok else "FAIL", seconds, figure))
    print(f"\nGPU check: {environment(mode)}")
    width = max([len("step")] + [len(r[0]) for r in rows])
    print(f"{'step':<{width}}  result  seconds  key figure")
    for name, result, seconds, figure in rows:
        print(f"{name:<{width}}  {result:<6}  {seconds:>7}  {figure}")
    verdict = "all steps passed" if rows and not failed else f"{failed} of {len(rows)} steps FAILED"
    print(f"{verdict}; full logs in {log_dir}")
    return 1 if failed or not rows else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("resume", help="compare an uninterrupted run's log with a resumed one's")
    r.add_argument("a_log", type=Path)
    r.add_argument("b_log", type=Path)
    r.add_argument("--save-iteration", type=int, required=True)
    r.add_argument("--last", type=int, required=True)
    r.add_argument("--rtol", type=float, default=1e-3,
                   help="allowed relative difference, used only when the runs differ before the save")
    r.add_argument("--outputs", type=Path, nargs="*", default=[],
                   help="the console output of run A, run B and run B resumed: their kernel choices are compared")
    t = sub.add_parser("table", help="print the closing table")
    t.add_argument("log_dir", type=Path)
    t.add_argument("--mode", choices=["gpu", "cpu"], default="gpu")
    args = ap.parse_args(argv)
    if args.command == "resume":
        ok, line = compare_resume(read_train_records(args.a_log), read_train_records(args.b_log),
                                  args.save_iteration, args.last, args.rtol)
        picks = kernel_choices(args.outputs)
        if len(set(picks.values())) > 1:
            line += "; the runs' kernels differ: " + "; ".join(f"{k}: {v}" for k, v in picks.items())
        print(f"resume: {line}", flush=True)
        return 0 if ok else 1
    return table(args.log_dir, args.mode)


if __name__ == "__main__":
    sys.exit(main())
