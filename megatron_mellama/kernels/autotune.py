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


def run_shapes(cfg, tp: int = 1) -> dict:
    """The shapes one rank of a run sees (one micro-batch; heads, FFN and vocabulary split over TP)."""
    m, t = cfg.model, cfg.train
    return dict(tokens=t.micro_batch_size * cfg.seq_length, hidden=m.hidden_size,
                heads=m.num_attention_heads // tp, kv_heads=max(m.kv_heads // tp, 1), head_dim=m.head_dim,
                ffn=m.ffn_size // tp, vocab=m.padded_vocab_size // tp, eps=m.norm_epsilon,
                dtype=torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else torch.float32)


def workload(op: str, device: torch.device, shapes: dict | None, seed: int = 0):
    """`(forward, leaves)`: a call running `op` once on inputs of the run's shapes, and the inputs
    that take gradients. The same seed gives the same inputs (to compare backends)."""
    from . import apply_rotary_qk, attention, linear_cross_entropy, rms_norm, swiglu

    s = {**DEFAULT_SHAPES, **(shapes or {})}
    dtype, n = s["dtype"], s["tokens"]
    seq = min(n, 4096)
    batch = max(n // seq, 1)
    g = torch.Generator(device=device).manual_seed(seed)

    def make(*shape, dt=dtype, std=1.0):
        return (torch.randn(*shape, device=device, generator=g) * std).to(dt).requires_grad_()

    if op == "rms_norm":
        x, w = make(n, s["hidden"]), make(s["hidden"], dt=torch.float32)
        return (lambda: rms_norm(x, w, s["eps"])), [x, w]
    if op == "swiglu":
        gate, up = make(n, s["ffn"]), make(n, s["ffn"])
        return (lambda: swiglu(gate, up)), [gate, up]
    if op == "rotary":
        q, k = make(batch, seq, s["heads"], s["head_dim"]), make(batch, seq, s["kv_heads"], s["head_dim"])
        angles = torch.rand(seq, s["head_dim"] // 2, device=device, generator=g) * seq
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos(), angles.sin()

        def forward():
            # the model's layout: (batch, heads, seq, head_dim) views of (batch, seq, heads, head_dim)
            rotated = apply_rotary_qk(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            return torch.cat([t.flatten() for t in rotated])
        return forward, [q, k]
    if op == "attention":
        q = make(batch, s["heads"], seq, s["head_dim"])
        k, v = make(batch, s["kv_heads"], seq, s["head_dim"]), make(batch, s["kv_heads"], seq, s["head_dim"])
        return (lambda: attention(q, k, v)), [q, k, v]
    if op == "cross_entropy":
        h, w = make(n, s["hidden"]), make(s["vocab"], s["hidden"], dt=torch.float32, std=0.02)
        labels = torch.randint(0, s["vocab"], (n,), device=device, generator=g)

        def forward():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                return linear_cross_entropy(h, w, labels)
        return forward, [h, w]
    raise ValueError(f"unknown operation {op!r}")


def time_backend(op: str, backend: str, device: torch.device, shapes: dict | None, repeats: int = 5) -> float:
    """Median seconds of one forward+backward of `op` with `backend`."""
    from .dispatch import use_backends

    with use_backends({op: backend}):
        forward, _ = workload(op, device, shapes)

        def run():
            forward().float().sum().backward()

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
