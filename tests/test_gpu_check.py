"""benchmarks/gpu_check.sh, the self-check users run on a new GPU node: its CPU mode runs every step
end to end and its table says each passed and that the resume was exact; a broken step is reported
and the next one still runs; the figures are read from what the benchmarks print on a GPU."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ("triton_tests", "kernels", "engine", "resume")

_spec = importlib.util.spec_from_file_location("gpu_check_table", ROOT / "benchmarks" / "gpu_check_table.py")
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)


def _run(tmp_path, *args, timeout=600, **env):
    full_env = dict(os.environ, GPU_CHECK_PYTHON=sys.executable, GPU_CHECK_LOG_DIR=str(tmp_path / "logs"))
    full_env.update(env)
    full_env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full_env,
                          cwd=tmp_path, timeout=timeout)


def _rows(stdout: str) -> dict:
    """{step: (result, key figure)} from the closing table."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("step ") and "key figure" in line)
    rows = {}
    for line in lines[start + 1:]:
        parts = line.split(None, 3)
        if parts and parts[0] in STEPS:
            rows[parts[0]] = (parts[1], parts[3] if len(parts) > 3 else "")
    return rows


def test_the_script_is_valid_bash():
    out = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_cpu_mode_runs_every_step_and_the_resume_is_exact(tmp_path):
    pytest.importorskip("triton")
    out = _run(tmp_path, "--cpu")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    rows = _rows(out.stdout)
    assert set(rows) == set(STEPS), out.stdout
    assert all(result == "pass" for result, _ in rows.values()), out.stdout
    assert rows["resume"][1].startswith("exact:"), out.stdout
    assert "worst" in rows["kernels"][1] and "transformers" in rows["engine"][1], out.stdout
    # the table comes last, and says where the logs are
    assert out.stdout.rstrip().splitlines()[-1].startswith("all steps passed; full logs in ")
    logs = tmp_path / "logs"
    assert all((logs / f"{step}.log").stat().st_size > 0 for step in STEPS)
    assert (logs / "A.jsonl").exists() and (logs / "B.jsonl").exists()


@pytest.mark.slow
def test_a_broken_step_is_reported_and_the_next_one_still_runs(tmp_path):
    # the first step runs a failing command; the second runs out of its time limit
    out = _run(tmp_path, "--cpu", GPU_CHECK_STEPS="triton_tests,kernels", GPU_CHECK_BREAK="triton_tests",
               GPU_CHECK_TIMEOUT_KERNELS="1")
    assert out.returncode != 0
    rows = _rows(out.stdout)
    assert set(rows) == {"triton_tests", "kernels"}, out.stdout
    assert rows["triton_tests"] == ("FAIL", "exit 3; see log (Triton interpreter)"), out.stdout
    assert rows["kernels"][0] == "FAIL" and rows["kernels"][1].startswith("timed out at 1 s"), out.stdout
    assert "deliberately broken" in (tmp_path / "logs" / "triton_tests.log").read_text()
    assert "2 of 2 steps FAILED" in out.stdout.splitlines()[-1]


@pytest.mark.slow
def test_without_a_gpu_the_gpu_mode_refuses_and_points_to_cpu_mode(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    out = _run(tmp_path, timeout=120)
    assert out.returncode == 2 and "--cpu" in out.stderr


# ---------------------------------------------------------------- the resume comparison

def _records(losses, grads, start=1):
    return [dict(iteration=start + i, consumed_samples=4 * (start + i), lr=1e-3, lm_loss=loss, grad_norm=grad)
            for i, (loss, grad) in enumerate(zip(losses, grads))]


def test_resume_exact_passes():
    a = _records([5.0 - 0.1 * i for i in range(4)], [1.0] * 4)
    ok, line = table.compare_resume(a, list(a), save_iteration=2, last=4, rtol=1e-3)
    assert ok and line.startswith("exact")


def test_resume_that_differs_only_after_the_save_fails_with_its_difference():
    a = _records([5.0, 4.9, 4.8, 4.7], [1.0] * 4)
    b = _records([5.0, 4.9, 4.8, 4.7 + 1e-6], [1.0] * 4)
    ok, line = table.compare_resume(a, b, save_iteration=2, last=4, rtol=1e-3)
    assert not ok and "lm_loss 1e-06" in line and "resume not exact" in line


def test_resume_on_a_device_that_is_not_bitwise_reproducible_passes_within_tolerance():
    a = _records([5.0, 4.9, 4.8, 4.7], [1.0] * 4)
    close = _records([5.0 + 1e-6, 4.9, 4.8 + 2e-5, 4.7], [1.0] * 4)
    ok, line = table.compare_resume(a, close, save_iteration=2, last=4, rtol=1e-3)
    assert ok and "not bitwise reproducible" in line and "within" in line
    far = _records([5.0 + 1e-6, 4.9, 4.9, 4.7], [1.0] * 4)
    assert not table.compare_resume(a, far, save_iteration=2, last=4, rtol=1e-3)[0]


def test_a_resume_that_restarted_from_scratch_is_caught():
    # its iterations 3-4 equal A's, but it logged 1-2 twice: the checkpoint was not loaded
    a = _records([5.0, 4.9, 4.8, 4.7], [1.0] * 4)
    b = a[:2] + a
    ok, line = table.compare_resume(a, b, save_iteration=2, last=4, rtol=1e-3)
    assert not ok and "1-2, 1-4" in line


def test_resume_reads_json_lines_and_skips_evaluation_records(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"iteration": 1, "lm_loss": 5.0, "grad_norm": null}\n\n'
                   '{"iteration": 1, "consumed_samples": 4, "eval": {"all": {"lm_loss": 5.1}}}\n')
    assert table.read_train_records(log) == [{"iteration": 1, "lm_loss": 5.0, "grad_norm": None}]


# ---------------------------------------------------------------- figures read from GPU output

KERNELS_GPU = """NVIDIA H200; torch 2.11.0+cu130; backends here: torch, triton

operations (forward + backward), 4096 tokens, bfloat16:
       rms_norm  torch:     0.145 ms   1.00x torch
       rms_norm triton:     0.045 ms   3.22x torch  max rel. difference 3.9e-03 ok
      attention  torch:     1.975 ms   1.00x torch
  cross_entropy triton:     2.052 ms   0.52x torch  max rel. difference 6.8e-02 ABOVE TOLERANCE
         swiglu triton: failed (RuntimeError: CUDA error: an illegal memory access was encountered)

training, 1b shape, sequence 4096, global batch 4 (micro 1):
      engine torch:     30,512 tokens/s,  270.1 TFLOP/s, MFU  27.3%  1.02x transformers
       engine auto:     41,017 tokens/s,  363.2 TFLOP/s, MFU  36.7%  1.37x transformers
      transformers:     29,914 tokens/s,  264.8 TFLOP/s, MFU  26.8%
"""

ENGINE_GPU = """shape 1b: 1,100.0M parameters, sequence 4096, global batch 4 (micro 1), bf16 on cuda (16 threads)
      engine: 41,234 tokens/s, 365.1 TFLOP/s, MFU 36.9%, peak memory 30.2 GiB
transformers: 29,870 tokens/s, 264.5 TFLOP/s, MFU 26.7%, peak memory 35.0 GiB
ratio engine / transformers: 1.38x
"""


def test_kernel_figures_name_the_worst_backend_and_fail_above_tolerance():
    ok, figure = table.judge("kernels", KERNELS_GPU, 0, 110, "gpu")
    assert not ok
    assert "worst 6.8e-02 (cross_entropy/triton)" in figure and "ABOVE TOLERANCE: cross_entropy/triton" in figure
    assert "failed: swiglu/triton" in figure and "auto 1.37x transformers" in figure
    clean = "\n".join(line for line in KERNELS_GPU.splitlines() if "ABOVE" not in line and "failed (" not in line)
    ok, figure = table.judge("kernels", clean, 0, 110, "gpu")
    assert ok and figure == "1 checked, worst 3.9e-03 (rms_norm/triton) ok; auto 1.37x transformers"


def test_engine_figures_and_see_log_when_there_are_none():
    assert table.judge("engine", ENGINE_GPU, 0, 100, "gpu") == (
        True, "41,234 tokens/s, MFU 36.9%, 1.38x transformers")
    assert table.judge("engine", "Traceback ...\nRuntimeError: CUDA out of memory", 1, 100, "gpu") == (
        False, "exit 1; see log")
    ok, figure = table.judge("engine", "shape 1b: ...", 124, 100, "gpu")
    assert not ok and figure == "timed out at 100 s; see log"


def test_triton_test_figures():
    assert table.judge("triton_tests", "....\n122 passed in 41.20s\n", 0, 60, "gpu") == (True, "122 passed")
    # pytest exits 0 when Triton is missing and everything is skipped: nothing was checked
    assert table.judge("triton_tests", "s\n1 skipped in 0.02s\n", 0, 60, "gpu") == (False, "1 skipped")
    log = ("FAILED tests/test_kernels_triton.py::test_swiglu - ValueError: Pointer argument (at 0) cannot be "
           "accessed from Triton (cpu tensor?)\n====== 120 failed, 2 passed in 9.81s ======\n")
    ok, figure = table.judge("triton_tests", log, 1, 60, "gpu")
    assert not ok and figure.startswith("exit 1; 120 failed, 2 passed; the tests make CPU tensors")


def test_the_kernel_choices_of_the_runs_are_compared(tmp_path):
    a, b = tmp_path / "resume_A.log", tmp_path / "B2.out"
    a.write_text("LLaMA2 tiny: ...\nkernels: rms_norm triton, attention torch\n")
    b.write_text("kernels: rms_norm torch, attention torch\n")
    assert table.kernel_choices([a, b, tmp_path / "missing.out"]) == {
        "resume_A": "rms_norm triton, attention torch", "B2": "rms_norm torch, attention torch"}


# ---------------------------------------------------------------- the resume step's kernels

STUB_PYTHON = """#!/usr/bin/env bash
# a python that says CUDA is there and records every other command line instead of running it
case "$1" in -c) exit 0 ;; esac
printf '%s\\n' "$*" >> "$GPU_CHECK_STUB_CALLS"
"""


def _resume_pretrain_calls(tmp_path, **env) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """The GPU mode's resume step with a stub python: the pretrain command lines it would run."""
    tmp_path.mkdir(exist_ok=True)
    stub, calls = tmp_path / "python", tmp_path / "calls.txt"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    out = _run(tmp_path, timeout=120, GPU_CHECK_PYTHON=str(stub), GPU_CHECK_STUB_CALLS=str(calls),
               GPU_CHECK_STEPS="resume", **env)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return out, [line.split() for line in lines if "megatron_mellama.pretrain" in line]


@pytest.mark.slow
def test_gpu_resume_runs_pin_one_kernel_backend(tmp_path):
    """`auto` would time kernels in a child process at each of the three starts (inside the step's
    80 s) and could pick differently after the restart: a resume that differs for no fault of the
    checkpoint. The three runs name one fixed backend, torch unless GPU_CHECK_RESUME_KERNELS says."""
    out, runs = _resume_pretrain_calls(tmp_path)
    assert len(runs) == 3, out.stdout + out.stderr
    backends = [run[run.index("--kernel-backend") + 1] if "--kernel-backend" in run else "auto" for run in runs]
    assert backends == ["torch"] * 3, runs
    _, runs = _resume_pretrain_calls(tmp_path / "triton", GPU_CHECK_RESUME_KERNELS="triton")
    assert [run[run.index("--kernel-backend") + 1] for run in runs] == ["triton"] * 3


@pytest.mark.slow
def test_gpu_resume_refuses_auto_kernels(tmp_path):
    out, runs = _resume_pretrain_calls(tmp_path, GPU_CHECK_RESUME_KERNELS="auto")
    assert out.returncode == 2 and not runs
    assert "GPU_CHECK_RESUME_KERNELS" in out.stderr and len(out.stderr.strip().splitlines()) == 1
