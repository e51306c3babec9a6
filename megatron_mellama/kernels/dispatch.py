"""Which backend runs each operation.

One process-wide table maps every operation to a backend module; the model calls the operations
through `megatron_mellama.kernels` and never names a backend. `configure()` fills the table once per
run from `--kernel-backend`:

- `torch`: the reference for every operation.
- `triton`, `te`, `apex`: that backend for the operations it has, the reference for the rest. A
  backend that cannot run here (package missing, no GPU, Triton on the CPU without its interpreter)
  is reported once and replaced by the reference; a run never stops for it.
- `auto`: on a GPU, the fastest available backend per operation, timed at start-up on the run's
  shapes (see `autotune.py`), rank 0's choice for every rank; on the CPU the reference (Triton's
  interpreter is a test tool).
- with `--compile`, the norm, rotary embedding and SwiGLU stay with the reference whatever the
  choice: they sit inside the compiled blocks, where Inductor generates fused Triton for them.

Meta tensors and DTensors take the reference: the reference's ops know how to shard, the fused
kernels see plain local tensors. (The one DTensor case worth a kernel, the sequence-parallel norm,
is unwrapped in `kernels.rms_norm`.)
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..config.sections import KERNEL_BACKENDS as KERNEL_BACKEND_CHOICES
from .autotune import fastest

log = logging.getLogger(__name__)

BACKENDS = tuple(b for b in KERNEL_BACKEND_CHOICES if b != "auto")

# an operation and the functions a backend module must define to provide it
OPERATIONS = {
    "rms_norm": ("rms_norm",),
    "rotary": ("apply_rotary_qk",),
    "swiglu": ("swiglu",),
    "attention": ("attention",),
    "cross_entropy": ("logsumexp_rows", "cross_entropy_grad"),
}

_MODULES = {"torch": "reference", "triton": "triton_ops", "te": "te_ops", "apex": "apex_ops"}
_loaded: dict[tuple[str, str], tuple[ModuleType | None, str]] = {}
_reported: set[tuple[str, int]] = set()
_table: dict[str, str] = {op: "torch" for op in OPERATIONS}


def backend_module(backend: str, device_type: str = "cuda", report: int = logging.WARNING) -> ModuleType | None:
    """The module implementing `backend` on `device_type`, or None if it cannot run here.

    Why it cannot is logged once per backend at level `report`: a warning when the backend was
    asked for, information when `auto` only looked for it."""
    key = (backend, device_type)
    if key not in _loaded:
        _loaded[key] = _load(backend, device_type)
    module, reason = _loaded[key]
    if module is None and (backend, report) not in _reported:
        _reported.add((backend, report))
        log.log(report, "kernel backend %r is not available (%s); its operations use the torch reference",
                backend, reason)
    return module


def _load(backend: str, device_type: str) -> tuple[ModuleType | None, str]:
    if backend not in _MODULES:
        raise ValueError(f"unknown kernel backend {backend!r}; choose from {', '.join(KERNEL_BACKEND_CHOICES)}")
    if device_type == "cpu" and backend in ("te", "apex"):
        return None, "it needs a CUDA device"
    if device_type == "cpu" and backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        return None, "on the CPU Triton runs only under its interpreter: set TRITON_INTERPRET=1"
    try:
        return importlib.import_module(f"{__package__}.{_MODULES[backend]}"), ""
    except ImportError as exc:
        return None, str(exc)


def provides(module: ModuleType, op: str) -> bool:
    return all(hasattr(module, fn) for fn in OPERATIONS[op])


def available(op: str, device_type: str) -> list[str]:
    """The backends that can run `op` on `device_type`, the reference first."""
    out = []
    for backend in BACKENDS:
        module = backend_module(backend, device_type, report=logging.INFO)
        if module is not None and provides(module, op):
            out.append(backend)
    return out


# inside the blocks `--compile` compiles: Inductor writes its own fused Triton for these, and our
# kernels there would only break its graph
COMPILED_BY_INDUCTOR = ("rms_norm", "rotary", "swiglu")


def configure(choice: str, device: torch.device | str = "cpu", timing_shapes=None,
              compiled: bool = False) -> dict[str, str]:
    """Set the backend of every operation from a `--kernel-backend` value; returns the table.

    `compiled`: the transformer blocks run under torch.compile, so the element-wise operations in
    them stay with the reference and Inductor fuses them."""
    device_type = torch.device(device).type
    if choice not in KERNEL_BACKEND_CHOICES:
        raise ValueError(f"unknown kernel backend {choice!r}; choose from {', '.join(KERNEL_BACKEND_CHOICES)}")
    table = {}
    for op in OPERATIONS:
        if compiled and op in COMPILED_BY_INDUCTOR:
            table[op] = "torch"
        elif choice == "auto":
            if device_type == "cpu":
                table[op] = "torch"
            else:
                table[op] = fastest(op, available(op, device_type), torch.device(device), timing_shapes)
        else:
            module = backend_module(choice, device_type)
            table[op] = choice if module is not None and provides(module, op) else "torch"
    if choice == "auto" and device_type != "cpu" and dist.is_initialized() and dist.get_world_size() > 1:
        # timings differ a little from rank to rank: every rank runs what rank 0 measured fastest
        shared = [table]
        dist.broadcast_object_list(shared, src=0)
        table = shared[0]
    _table.update(table)
    log.info("kernels: %s", ", ".join(f"{op}={b}" for op, b in table.items()))
    return dict(table)


def selected() -> dict[str, str]:
    return dict(_table)


class use_backends:
    """Run a block with another table (tests and benchmarks): `with use_backends("triton"): ...`."""

    def __init__(self, choice: str | dict[str, str], device: torch.device | str = "cpu"):
        self.choice, self.device = choice, device

    def __enter__(self):
        self.saved = dict(_table)
        if isinstance(self.choice, dict):
            _table.update(self.choice)
        else:
            configure(self.choice, self.device)
        return selected()

    def __exit__(self, *exc):
        _table.clear()
        _table.update(self.saved)


def implementation(op: str, example: torch.Tensor) -> ModuleType:
    """The module that runs `op` for tensors like `example`."""
    backend = _table[op]
    if backend != "torch" and example.device.type != "meta" and not isinstance(example, DTensor):
        module = backend_module(backend, example.device.type)
        if module is not None:
            return module
    return backend_module("torch", example.device.type)
