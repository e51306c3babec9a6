"""The backends, and the process-wide table of which one runs each operation.

The model calls the operations through `megatron_mellama.kernels` and never names a backend:
`implementation(op, tensor)` returns the module the table names for `op`. This module only holds
the table and loads backends; deciding what goes in the table is `choice.py`'s job, and timing
candidates is `autotune.py`'s.

A backend is a module defining an operation's functions (`OPERATIONS`), with the names, shapes and
dtypes of `reference.py`. A module may also declare:
- `COMPILE_SAFE`: the operations whose functions torch.compile (dynamo) traces into one graph
  (`fullgraph=True`); none if absent.
- `unavailable_reason(device_type)`: why it cannot run on that device type, or None.
A backend that cannot be loaded (package missing, wrong device, its own reason) is reported once
and its operations use the reference; a run never stops for it.

Meta tensors and DTensors take the reference: the reference's ops know how to shard, the fused
kernels see plain local tensors. (The one DTensor case worth a kernel, the sequence-parallel norm,
is unwrapped in `ops.rms_norm`.)
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from dataclasses import dataclass
from types import ModuleType

import torch
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)

# an operation and the functions a backend module must define to provide it
OPERATIONS = {
    "rms_norm": ("rms_norm",),
    "rotary": ("apply_rotary_qk",),
    "swiglu": ("swiglu",),
    "attention": ("attention",),
    "cross_entropy": ("logsumexp_rows", "cross_entropy_grad"),
}

REFERENCE = "torch"


@dataclass(frozen=True)
class Backend:
    module: str  # importable by this name, also in a freshly spawned process (autotune's timing child)
    device_types: tuple[str, ...] | None = None  # None: any; checked before importing the module


_BACKENDS: dict[str, Backend] = {
    REFERENCE: Backend(f"{__package__}.reference"),
    "triton": Backend(f"{__package__}.triton_ops"),
    # importing Transformer Engine or apex where there is no GPU can itself fail or take long
    "te": Backend(f"{__package__}.te_ops", ("cuda",)),
    "apex": Backend(f"{__package__}.apex_ops", ("cuda",)),
}
_loaded: dict[tuple[str, str], tuple[ModuleType | None, str]] = {}
_reported: set[tuple[str, int]] = set()
_table: dict[str, str] = {op: REFERENCE for op in OPERATIONS}


def register_backend(name: str, module: str, device_types: tuple[str, ...] | None = None) -> None:
    """Make module `module` selectable as backend `name` (replacing any backend of that name)."""
    _BACKENDS[name] = Backend(module, device_types)
    for key in [k for k in _loaded if k[0] == name]:
        del _loaded[key]


def unregister_backend(name: str) -> None:
    if name == REFERENCE:
        raise ValueError("the reference cannot be removed")
    _BACKENDS.pop(name, None)
    for key in [k for k in _loaded if k[0] == name]:
        del _loaded[key]
    for op, backend in _table.items():
        if backend == name:
            _table[op] = REFERENCE


def registered() -> dict[str, Backend]:
    """Every backend by name, the reference first."""
    return dict(_BACKENDS)


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
    if backend not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose from {', '.join(_BACKENDS)}")
    spec = _BACKENDS[backend]
    if spec.device_types is not None and device_type not in spec.device_types:
        return None, f"it runs on {' or '.join(spec.device_types)} devices only, not {device_type}"
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        return None, str(exc)
    reason = module.unavailable_reason(device_type) if hasattr(module, "unavailable_reason") else None
    return (None, reason) if reason else (module, "")


def provides(module: ModuleType | None, op: str) -> bool:
    return module is not None and all(hasattr(module, fn) for fn in OPERATIONS[op])


def compile_safe(module: ModuleType, op: str) -> bool:
    """Whether torch.compile traces `module`'s `op` without a graph break (the module says so)."""
    return op in getattr(module, "COMPILE_SAFE", ())


def available(op: str, device_type: str) -> list[str]:
    """The backends that can run `op` on `device_type`, the reference first."""
    return [b for b in _BACKENDS if provides(backend_module(b, device_type, report=logging.INFO), op)]


def set_table(table: dict[str, str]) -> None:
    """Name the backend of some operations (the others keep theirs)."""
    unknown = set(table) - set(OPERATIONS)
    if unknown:
        raise ValueError(f"unknown kernel operations {sorted(unknown)}")
    _table.update(table)


def selected() -> dict[str, str]:
    return dict(_table)


@contextlib.contextmanager
def override(table: dict[str, str]):
    """Run a block with some operations on other backends, then restore the whole table."""
    saved = dict(_table)
    try:
        set_table(table)
        yield selected()
    finally:
        _table.clear()
        _table.update(saved)


def implementation(op: str, example: torch.Tensor) -> ModuleType:
    """The module that runs `op` for tensors like `example`."""
    backend = _table[op]
    if backend != REFERENCE and example.device.type != "meta" and not isinstance(example, DTensor):
        module = backend_module(backend, example.device.type)
        if module is not None:
            return module
    return backend_module(REFERENCE, example.device.type)


def reference_for(example: torch.Tensor) -> ModuleType:
    """The reference module, for calls with arguments only the reference takes (per-token tables)."""
    return backend_module(REFERENCE, example.device.type)
