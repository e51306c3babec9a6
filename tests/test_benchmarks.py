"""The kernel benchmark runs end to end on tiny shapes (its figures are not checked: benchmarks
measure, tests do not time). What a GPU session would run first must not fail on code the CPU
can reach: operation timing and `--check` with the Triton interpreter, the memory comparison,
and the engine beside transformers."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_benchmark_runs_and_every_checked_backend_is_within_tolerance():
    pytest.importorskip("triton")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_speed.py"), "--seq-length", "32", "--micro-batch-size", "2",
         "--steps", "1", "--warmup", "1", "--repeats", "1", "--memory-tokens", "64", "--memory-vocab", "100",
         "--check", "--include-interpreter"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    checked = [line for line in out.stdout.splitlines() if "max rel. difference" in line]
    # Triton has the norm, rotary, SwiGLU and cross-entropy; attention stays with the reference
    assert len(checked) == 4 and all(line.endswith(" ok") for line in checked), out.stdout
    assert "fused      :" in out.stdout
    for side in ("engine torch:", "engine auto:", "transformers:"):
        assert side in out.stdout


def test_checkpoint_benchmark_runs():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "checkpoint.py"), "--hidden", "64", "--layers", "2",
                          "--vocab", "256", "--repeats", "1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "save:" in out.stdout and "load:" in out.stdout and "of which checksums" in out.stdout


def test_context_parallel_benchmark_prints_cp1_cp2_and_their_ratios():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "context_parallel.py"), "--seq-lengths", "256",
                          "--steps", "1", "--hidden", "64", "--layers", "2", "--vocab", "256"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("causal", "packed"))]
    # masking, seq, CP, then tokens/s and the two memory figures (with their unit, or a ratio each)
    assert [row[:3] for row in rows] == [[m, "256", cp] for m in ("causal", "packed") for cp in ("1", "2", "2/1")], \
        out.stdout
    for row in rows:
        ratios = row[2] == "2/1"
        assert all(f.endswith("x") or f == "-" for f in row[3:]) if ratios else row[5::2] == ["MiB", "MiB"], row


def test_preprocess_benchmark_runs_both_backends_and_the_memory_run(tmp_path):
    pytest.importorskip("gigatoken")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "preprocess.py"), "--sizes-mb", "1",
                          "--workers", "1", "--memory-mb", "1", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 1 MB | 1 |")]
    assert [row.split("|")[3].split(")")[0].strip() for row in rows] == ["(1", "(2", "(3"]
    assert "(1) vs (2) and (3): .bin and .idx byte-identical" in out.stdout
    assert "runs (4) and (5) skipped: neither --megatron-lm nor --megatron-git given" in out.stdout
    assert "memory run, --distinct-words" in out.stdout
