"""The Triton kernels compiled ahead of time to GPU machine code (cubin) for sm_90 (H100/H200) and
sm_80 (A100), with no GPU present.

The other kernel tests run on the CPU through Triton's interpreter, which executes the kernel body
with NumPy one operation at a time: it never runs the compiler's type checks, lowering and layout
passes or ptxas, nor meets a device's resource limits, so it accepts code that a GPU build rejects.
This test runs the real pipeline down to ptxas, in the dtypes and with the constexprs, warp counts and
argument specializations the wrappers in `triton_ops` launch with for LLaMA2-sized shapes. It proves
that the kernels compile for real GPUs, not that they run correctly there.

`@triton.jit` picks the interpreter when the kernel is defined if TRITON_INTERPRET is set, and the
conftest sets it for the whole session; so the compilation runs in a child process, this file run
as a script without that variable, which writes a JSON report that the test reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# compute capability -> the most shared memory one block may opt into on that GPU (A100: 163 KiB,
# H100/H200: 227 KiB); a kernel needing more compiles but fails at launch
TARGETS = {90: 227 * 1024, 80: 163 * 1024}

# a training step of 8192 tokens (micro-batch 2 x 4096)
TOKENS = 8192
SEQ = 4096
# LLaMA2's 32,000-token vocabulary, and the SM count of an H100 SXM (one rms_norm_bwd program per SM)
VOCAB = 32000
SMS = 132


# ---------------------------------------------------------------- child process

class _Tensor:
    """What a launch specializes on for a tensor argument: its dtype (and its alignment, assumed)."""

    def __init__(self, dtype: str):
        self.dtype = dtype


def _launch_variants():
    """(kernel name, variant label, kernel, positional args, constexprs, num_warps), built the way
    each wrapper in `triton_ops` builds its launch, with the wrapper's own block and warp choices."""
    import triton

    from megatron_mellama.kernels import triton_ops as K

    fp32, bf16, fp16, i64 = _Tensor("fp32"), _Tensor("bf16"), _Tensor("fp16"), _Tensor("i64")
    variants = []

    def add(kernel, label, args, constexprs, num_warps=4):
        variants.append((kernel.__name__, label, kernel, args, constexprs, num_warps))

    # RMSNorm: autocast feeds bf16 activations to fp32 weights, whose output is promoted to fp32;
    # 5120 (LLaMA2-13B) is not a power of two, so its block is masked
    # (--fp16 runs autocast in fp16: the fp16 variants of each kernel)
    for hidden, x, w in [(2048, fp32, fp32), (5120, bf16, fp32), (8192, bf16, bf16), (4096, fp16, fp32)]:
        y = fp32 if fp32 in (x, w) else bf16
        block = triton.next_power_of_2(hidden)
        label = f"x {x.dtype} w {w.dtype} hidden {hidden}"
        add(K._rms_norm_fwd, label, [x, w, y, fp32, hidden, hidden, hidden, 1e-5], {"BLOCK": block},
            K._num_warps(block))
        add(K._rms_norm_bwd, label, [y, x, w, fp32, x, fp32, hidden, hidden, hidden, TOKENS, hidden,
                                     triton.cdiv(TOKENS, SMS)], {"BLOCK": block}, K._num_warps(block))
    # no more rows than SMs: one row per program, and the launcher makes that 1 a constant
    add(K._rms_norm_bwd, "bf16 hidden 8192, 1 row per program",
        [bf16, bf16, bf16, fp32, bf16, fp32, 8192, 8192, 8192, SMS, 8192, 1], {"BLOCK": 8192}, K._num_warps(8192))

    # rotary: q and k are (batch, seq, heads, head_dim) projections viewed as (batch, heads, seq,
    # head_dim), their gradients contiguous, the tables fp32 (max_positions, head_dim); every
    # innermost stride is 1
    def rotary(label, x, heads, backward, head_dim=128):
        half = head_dim // 2
        if backward:
            x_strides = (heads * SEQ * head_dim, SEQ * head_dim, head_dim, 1)
        else:
            x_strides = (SEQ * heads * head_dim, head_dim, heads * head_dim, 1)
        y_strides = (heads * SEQ * head_dim, SEQ * head_dim, head_dim, 1)
        add(K._rotary, label, [x, x, fp32, fp32, heads, SEQ, half, *x_strides, *y_strides, head_dim, 1],
            {"BACKWARD": backward, "BLOCK_S": min(triton.next_power_of_2(SEQ), 16),
             "BLOCK_D": triton.next_power_of_2(half)})

    for x in (fp32, bf16, fp16):
        for backward in (False, True):
            rotary(f"{x.dtype} 32 heads {'backward' if backward else 'forward'}", x, 32, backward)
    # LLaMA2-70B's 8 key/value heads over 8 tensor-parallel ranks: one head, specialized to a constant
    rotary("bf16 1 head forward", bf16, 1, False)

    # SwiGLU over (tokens, ffn): LLaMA2-7B's ffn 11008, and LLaMA2-70B's 28672 over 32 sequences,
    # past 2^31 elements, where the launcher passes n as i64
    for x, n in [(fp32, TOKENS * 11008), (bf16, TOKENS * 11008), (fp16, TOKENS * 11008), (bf16, 32 * SEQ * 28672)]:
        label = f"{x.dtype} n {'i64' if n >= 2**31 else 'i32'}"
        add(K._swiglu_fwd, label, [x, x, x, n], {"BLOCK": K._SWIGLU_BLOCK})
        add(K._swiglu_bwd, label, [x, x, x, x, x, n], {"BLOCK": K._SWIGLU_BLOCK})

    # cross-entropy on a chunk of logits (rows, vocab): contiguous as the chunked loss makes them, so
    # the column stride is the constant 1, and once transposed, so it is not
    block = K._vocab_block(VOCAB)
    rows = 2**24 // VOCAB  # the chunked loss's 2^24 logits per chunk
    for x, strides, layout in [(fp32, (VOCAB, 1), "contiguous"), (bf16, (VOCAB, 1), "contiguous"),
                               (fp16, (VOCAB, 1), "contiguous"), (bf16, (1, rows), "transposed")]:
        label = f"{x.dtype} vocab {VOCAB} {layout}"
        add(K._logsumexp_rows, label, [x, fp32, *strides, VOCAB], {"BLOCK": block}, K._num_warps(block))
        add(K._cross_entropy_grad, label, [x, fp32, i64, fp32, *strides, VOCAB], {"BLOCK": block},
            K._num_warps(block))
    return variants


def _specialize(kernel, args, constexprs):
    """The signature, constants and attributes Triton's launcher derives from these arguments."""
    names = kernel.arg_names
    if len(names) != len(args) + len(constexprs) or any(names[len(args):].count(k) != 1 for k in constexprs):
        raise TypeError(f"{kernel.__name__}{tuple(names)} does not take {len(args)} arguments and {sorted(constexprs)}")
    signature, constants, attrs = {}, dict(constexprs), {}
    # PyTorch's caching allocator hands out 512-byte aligned blocks, and integers divisible by 16
    # are specialized on, as the launcher does
    aligned = [["tt.divisibility", 16]]
    for i, (name, value) in enumerate(zip(names, args)):
        if isinstance(value, _Tensor):
            signature[name] = "*" + value.dtype
            attrs[(i,)] = aligned
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name] = "constexpr"
            constants[name] = 1
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = aligned
    for name in constexprs:
        signature[name] = "constexpr"
    return signature, constants, attrs


def _compile_all(report_path: str) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    report = {"kernels": [], "results": []}
    try:
        # Triton bundles one ptxas for sm_80 and another for sm_90 and later
        from triton.backends.nvidia.compiler import get_ptxas

        for arch in TARGETS:
            subprocess.run([get_ptxas(arch).path, "--version"], check=True, capture_output=True)
    except Exception as exc:  # no CUDA backend in this triton, or its ptxas cannot run here
        report["skip"] = f"triton's CUDA backend cannot compile on this machine: {type(exc).__name__}: {exc}"
        Path(report_path).write_text(json.dumps(report))
        return

    from megatron_mellama.kernels import triton_ops as K

    report["kernels"] = sorted(name for name, obj in vars(K).items() if isinstance(obj, triton.runtime.JITFunction))
    for arch in TARGETS:
        target = GPUTarget("cuda", arch, 32)
        for name, label, kernel, args, constexprs, num_warps in _launch_variants():
            result = {"arch": arch, "kernel": name, "variant": label, "num_warps": num_warps}
            try:
                signature, constants, attrs = _specialize(kernel, args, constexprs)
                compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=target,
                                          options={"num_warps": num_warps})
                cubin = compiled.asm["cubin"]
                result.update(cubin_bytes=len(cubin), elf=cubin[:4] == b"\x7fELF",
                              shared=compiled.metadata.shared, compiled_warps=compiled.metadata.num_warps)
            except Exception as exc:
                result["error"] = f"{type(exc).__name__}: {exc}"[:4000]
            report["results"].append(result)
    Path(report_path).write_text(json.dumps(report))


# ---------------------------------------------------------------- test

def test_kernels_compile_to_cubin(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # a fresh cache: a cached cubin would skip the compilation under test
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    report_path = tmp_path / "report.json"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, str(report_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0 and report_path.exists(), f"compiler process failed:\n{proc.stderr[-6000:]}"
    report = json.loads(report_path.read_text())
    if "skip" in report:
        pytest.skip(report["skip"])

    results = report["results"]
    failures = [f"sm_{r['arch']} {r['kernel']} [{r['variant']}]: {r['error']}" for r in results if "error" in r]
    assert not failures, "kernels that do not compile:\n" + "\n\n".join(failures)

    assert report["kernels"], "triton_ops defines no JIT kernels: was it imported under the interpreter?"
    for arch, shared_limit in TARGETS.items():
        mine = [r for r in results if r["arch"] == arch]
        # a kernel added to triton_ops without a variant here would otherwise go unchecked
        assert sorted({r["kernel"] for r in mine}) == report["kernels"], f"sm_{arch}: kernels not compiled"
        for r in mine:
            where = f"sm_{arch} {r['kernel']} [{r['variant']}]"
            assert r["cubin_bytes"] > 0 and r["elf"], f"{where}: no cubin"
            assert r["compiled_warps"] == r["num_warps"], where
            assert r["shared"] <= shared_limit, f"{where}: {r['shared']} bytes of shared memory"
    print(f"{len(results)} kernel variants compiled in {elapsed:.1f} s")


if __name__ == "__main__":
    _compile_all(sys.argv[1])
