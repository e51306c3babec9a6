"""`--kernel-backend auto` on a GPU: time each available backend of an operation on the run's own
shapes (forward and backward, one micro-batch of one rank) and keep the fastest.

Timing costs a few hundred milliseconds per operation at start-up; a backend that fails on these
shapes is skipped with a warning.
"""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger(__name__)

DEFAULT_SHAPES = dict(tokens=4096, hidden=2048, heads=16, kv_heads=16, head_dim=128, ffn=5632, vocab=32000,
                      eps=1e-5, dtype=torch.bfloat16)


def workload(op: str, device: torch.device, shapes: dict):
    """A function running `op` forward and backward once on inputs of the run's shapes."""
    from . import apply_rotary_qk, attention, linear_cross_entropy, rms_norm, swiglu

    s = {**DEFAULT_SHAPES, **(shapes or {})}
    dtype, n = s["dtype"], s["tokens"]
    seq = min(n, 4096)
    batch = max(n // seq, 1)

    def make(*shape, dt=dtype):
        return torch.randn(*shape, device=device, dtype=dt, requires_grad=True)

    if op == "rms_norm":
        x, w = make(n, s["hidden"]), make(s["hidden"], dt=torch.float32)
        return lambda: rms_norm(x, w, s["eps"]).sum().backward()
    if op == "swiglu":
        g, u = make(n, s["ffn"]), make(n, s["ffn"])
        return lambda: swiglu(g, u).sum().backward()
    if op == "rotary":
        q = make(batch, s["heads"], seq, s["head_dim"])
        k = make(batch, s["kv_heads"], seq, s["head_dim"])
        angles = torch.rand(seq, s["head_dim"], device=device)
        cos, sin = angles.cos(), angles.sin()
        return lambda: sum(t.sum() for t in apply_rotary_qk(q, k, cos, sin)).backward()
    if op == "attention":
        q = make(batch, s["heads"], seq, s["head_dim"])
        k, v = make(batch, s["kv_heads"], seq, s["head_dim"]), make(batch, s["kv_heads"], seq, s["head_dim"])
        return lambda: attention(q, k, v).sum().backward()
    if op == "cross_entropy":
        h, w = make(n, s["hidden"]), make(s["vocab"], s["hidden"], dt=torch.float32)
        labels = torch.randint(0, s["vocab"], (n,), device=device)

        def run():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = linear_cross_entropy(h, w, labels)
            loss.backward()
        return run
    raise ValueError(f"unknown operation {op!r}")


def time_backend(op: str, backend: str, device: torch.device, shapes: dict | None, repeats: int = 5) -> float:
    """Median seconds of one forward+backward of `op` with `backend`."""
    from .dispatch import use_backends

    with use_backends({op: backend}):
        run = workload(op, device, shapes)
        run()  # compiles and warms up
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def fastest(op: str, candidates: list[str], device: torch.device, shapes: dict | None = None) -> str:
    """The backend among `candidates` that runs `op` fastest here; the reference if none beats it."""
    if len(candidates) <= 1:
        return candidates[0] if candidates else "torch"
    seconds = {}
    for backend in candidates:
        try:
            seconds[backend] = time_backend(op, backend, device, shapes)
        except Exception as exc:  # a backend failing on these shapes must not stop the run
            log.warning("kernel backend %r failed on %s (%s); not using it", backend, op, exc)
    best = min(seconds, key=seconds.get, default="torch")
    log.info("%s: %s", op, ", ".join(f"{b} {t * 1e3:.2f} ms" for b, t in sorted(seconds.items(), key=lambda x: x[1])))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
