"""Each kernel operation per backend, the fused loss's memory, and the engine with each backend.

    python benchmarks/kernel_speed.py                           # CPU: the torch reference only
    python benchmarks/kernel_speed.py --shape 1b --bf16         # on a GPU: every backend that imports

Three parts, all in one run:
1. every operation (forward + backward) with every backend available on the device, on the
   per-rank shapes of --shape, and each one's speed-up over the torch reference; --check also
   compares each backend's outputs and gradients with the reference's;
2. peak memory of the output layer + cross-entropy (forward + backward): full logits and torch's
   cross-entropy against the chunked fused loss (GPU: allocator peak; CPU: peak RSS of a fresh
   process, less that of a process holding only the inputs and their gradients);
3. the engine's training tokens/s (and on a GPU TFLOP/s and MFU) with each backend and `auto`,
   beside transformers.LlamaForCausalLM on the same batches (benchmarks/engine.py's timing).

On the CPU, Triton runs only under its interpreter, a correctness tool: it is timed only with
--include-interpreter.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import subprocess
import sys
from pathlib import Path

if "--include-interpreter" in sys.argv:
    # read when Triton defines a kernel: it must be set before anything imports Triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_mellama import kernels  # noqa: E402
from megatron_mellama.config import parse_config  # noqa: E402
from megatron_mellama.kernels import autotune, dispatch, workload  # noqa: E402
from megatron_mellama.model.flops import training_flops_per_token  # noqa: E402

_spec = importlib.util.spec_from_file_location("engine_benchmark", ROOT / "benchmarks" / "engine.py")
engine_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(engine_benchmark)

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def backends_here(device: torch.device, include_interpreter: bool) -> list[str]:
    out = ["torch"]
    for backend in ("triton", "te", "apex"):
        if backend == "triton" and device.type == "cpu" and not include_interpreter:
            continue
        if dispatch.backend_module(backend, device.type) is not None:
            out.append(backend)
    return out


def compare_with_reference(op: str, backend: str, device: torch.device, shapes: dict) -> float:
    """Largest difference of outputs and gradients from the reference's, relative to the reference's
    largest magnitude."""
    results = []
    for b in ("torch", backend):
        with kernels.use_backends({op: b}):
            forward, leaves = workload.workload(op, device, shapes, seed=1)
            out = forward()
            weights = torch.randn(out.shape, device=device, generator=torch.Generator(device).manual_seed(2))
            (out.float() * weights).sum().backward()
            results.append([out.detach().float()] + [t.grad.float() for t in leaves])
    worst = 0.0
    for ref, got in zip(*results):
        worst = max(worst, ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item())
    return worst


def time_operations(device, shapes, backends, check: bool) -> None:
    print(f"\noperations (forward + backward), {shapes['batch'] * shapes['seq']} tokens, "
          f"{str(shapes['dtype'])[6:]} (parameters {str(shapes['param_dtype'])[6:]}):")
    for op in kernels.OPERATIONS:
        base = None
        for backend in backends:
            module = dispatch.backend_module(backend, device.type)
            if not dispatch.provides(module, op):
                continue
            try:
                seconds = autotune.time_backend(op, backend, device, shapes)
            except Exception as exc:  # one backend failing on these shapes must not end the run
                print(f"  {op:>13} {backend:>6}: failed ({type(exc).__name__}: {exc})", flush=True)
                continue
            base = base or seconds
            line = f"  {op:>13} {backend:>6}: {seconds * 1e3:9.3f} ms  {base / seconds:5.2f}x torch"
            if check and backend != "torch":
                # rotary tables with YaRN's attention factor: a backend dropping it shows
                err = compare_with_reference(op, backend, device, workload.check_shapes(shapes))
                ok = err <= TOLERANCE[shapes["dtype"]]
                line += f"  max rel. difference {err:.1e} {'ok' if ok else 'ABOVE TOLERANCE'}"
            print(line, flush=True)


# ---- output-layer memory ---------------------------------------------------------------------------

def _output_layer(variant: str, device, tokens: int, hidden: int, vocab: int, dtype) -> None:
    g = torch.Generator(device).manual_seed(0)
    h = torch.randn(tokens, hidden, device=device, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    if variant == "inputs":  # the inputs and their gradients: what both variants must hold anyway
        h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)
        return
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        if variant == "full":
            loss = torch.nn.functional.cross_entropy((h @ w.t()).float(), labels, reduction="sum")
        else:
            loss = kernels.linear_cross_entropy(h, w, labels)
    loss.backward()


def output_layer_peak(variant, device, tokens, hidden, vocab, dtype) -> float:
    """Bytes the output layer needs beyond its inputs and their gradients."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _output_layer(variant, device, tokens, hidden, vocab, dtype)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        torch.cuda.empty_cache()
        return peak - _inputs_bytes(tokens, hidden, vocab)
    # CPU: a fresh process per variant, its peak RSS less that of a process holding only the inputs.
    # Every allocation above 64 KiB is its own mapping, returned when freed, so RSS follows what is
    # live (glibc would otherwise keep freed blocks up to 32 MiB in its heap)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")

    def child(v):
        out = subprocess.run([sys.executable, __file__, "--_memory-child", v, str(tokens), str(hidden), str(vocab),
                              str(dtype)], capture_output=True, text=True, check=True, env=env)
        return int(out.stdout.split()[-1])
    return child(variant) - child("inputs")


def _inputs_bytes(tokens, hidden, vocab) -> int:
    return 2 * 4 * (tokens * hidden + vocab * hidden)


def measure_memory(device, shapes) -> None:
    t, h, v, dtype = shapes["tokens"], shapes["hidden"], shapes["vocab"], shapes["dtype"]
    print(f"\noutput layer + cross-entropy, forward + backward: {t} tokens, hidden {h}, vocabulary {v}, "
          f"{str(dtype)[6:]}:")
    full = output_layer_peak("full", device, t, h, v, dtype)
    fused = output_layer_peak("fused", device, t, h, v, dtype)
    print(f"  full logits: {full / 2**20:8.1f} MiB beyond inputs and gradients")
    print(f"  fused      : {fused / 2**20:8.1f} MiB  ({full / max(fused, 1):.1f}x less)", flush=True)


def _memory_child(variant, tokens, hidden, vocab, dtype) -> None:
    torch.set_num_threads(1)
    _output_layer(variant, torch.device("cpu"), int(tokens), int(hidden), int(vocab), getattr(torch, dtype[6:]))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


# ---- the engine with each backend -------------------------------------------------------------------

def time_engines(args, device, flags, backends) -> None:
    tokens_per_step = args.global_batch_size * args.seq_length
    rates = {}
    sides = [(b, engine_benchmark.time_engine) for b in backends + ["auto"]]
    sides.append(("transformers", engine_benchmark.time_transformers))
    cfg = None
    for _ in range(args.repeats):
        for name, fn in sides:
            cfg = parse_config(flags + ([] if name == "transformers" else ["--kernel-backend", name]))
            batches = engine_benchmark._batches(cfg, args.warmup + args.steps, device)
            rate = args.steps * tokens_per_step / fn(cfg, batches, args.warmup, device)
            rates[name] = max(rate, rates.get(name, 0.0))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    flops_per_token = training_flops_per_token(cfg.model, cfg.seq_length)
    print(f"\ntraining, {args.shape} shape, sequence {args.seq_length}, global batch {args.global_batch_size} "
          f"(micro {args.micro_batch_size}):")
    for name, rate in rates.items():
        line = f"  {'engine ' + name if name != 'transformers' else name:>16}: {rate:10,.0f} tokens/s"
        if device.type == "cuda":
            tflops = rate * flops_per_token / 1e12
            line += f", {tflops:6.1f} TFLOP/s, MFU {100 * tflops / args.peak_tflops:5.1f}%"
        if name != "transformers":
            line += f"  {rate / rates['transformers']:.2f}x transformers"
        print(line)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--_memory-child":
        _memory_child(*sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(engine_benchmark.SHAPES), default="small")
    ap.add_argument("--seq-length", type=int, default=None, help="default: 4096 on a GPU, 256 on the CPU")
    ap.add_argument("--micro-batch-size", type=int, default=None, help="default: 1 on a GPU, 4 on the CPU")
    ap.add_argument("--global-batch-size", type=int, default=None, help="default: 8 x the micro-batch size")
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per side (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="alternate the sides this often, keep each best")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--check", action="store_true", help="also compare every backend with the reference")
    ap.add_argument("--include-interpreter", action="store_true",
                    help="on the CPU, also time Triton under TRITON_INTERPRET=1 (slow; correctness only)")
    ap.add_argument("--memory-tokens", type=int, default=4096, help="tokens for the output-layer memory test")
    ap.add_argument("--memory-vocab", type=int, default=32000, help="vocabulary for it (LLaMA2's)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["operations", "memory", "training"])
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    args.seq_length = args.seq_length or (4096 if gpu else 256)
    args.micro_batch_size = args.micro_batch_size or (1 if gpu else 4)
    args.global_batch_size = args.global_batch_size or 8 * args.micro_batch_size
    flags = engine_benchmark.SHAPES[args.shape] + [
        "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(args.global_batch_size), "--lr", "1e-4", "--weight-decay", "0.1",
        "--clip-grad", "1.0", "--lr-decay-style", "constant"] + (["--bf16"] if args.bf16 else [])
    cfg = parse_config(flags)
    shapes = workload.run_shapes(cfg)
    backends = backends_here(device, args.include_interpreter)
    name = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}; torch {torch.__version__}; backends here: {', '.join(backends)}", flush=True)
    if "operations" not in args.skip:
        time_operations(device, shapes, backends, args.check)
    if "memory" not in args.skip:
        measure_memory(device, dict(shapes, tokens=args.memory_tokens, vocab=args.memory_vocab))
    if "training" not in args.skip:
        time_engines(args, device, flags, [b for b in backends if not (b == "triton" and not gpu)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
