"""Which backend runs each operation in a run: `configure()` fills the dispatch table once, from
`--kernel-backend`.

- `torch`: the reference for every operation.
- `triton`, `te`, `apex` (or any registered backend): that backend for the operations it has, the
  reference for the rest. A backend that cannot run here (package missing, no GPU, Triton on the
  CPU without its interpreter) is reported once and replaced by the reference.
- `auto`: on a GPU, the fastest available backend per operation, timed on the run's own inputs in
  a child process (`autotune.measure_isolated`) by global rank 0 alone; every other rank receives
  rank 0's table. On the CPU, the reference, untimed (Triton's interpreter is a test tool).
- `compiled` (`--compile`): the transformer blocks are compiled whole (`fullgraph=True`), where a
  call dynamo cannot trace is an error. The operations the blocks call therefore take only a
  backend that declares them traceable (`COMPILE_SAFE` in its module); Transformer Engine's
  attention, which dynamo is told to skip, is not, and the reference's SDPA (flash or cuDNN
  attention on a GPU) runs instead. Inductor fuses the reference's element-wise operations.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist

from . import dispatch
from .autotune import DEFAULT_TIMEOUT_S, measure_isolated
from .dispatch import OPERATIONS, REFERENCE

log = logging.getLogger(__name__)

# the operations the model calls inside a DecoderLayer, which `--compile` compiles; the final norm
# and the loss run outside, but a table has one backend per operation
IN_COMPILED_BLOCKS = ("rms_norm", "rotary", "swiglu", "attention")


def configure(choice: str, device: torch.device | str = "cpu", timing_shapes: dict | None = None,
              compiled: bool = False, timing_timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, str]:
    """Set the backend of every operation from a `--kernel-backend` value; returns the table.

    `timing_shapes`: what `auto` times on (`workload.run_shapes`). `compiled`: the transformer
    blocks run under torch.compile. `timing_timeout_s`: how long `auto` waits for its timing."""
    device = torch.device(device)
    if choice != "auto" and choice not in dispatch.registered():
        raise ValueError(f"unknown kernel backend {choice!r}; choose from auto, {', '.join(dispatch.registered())}")
    if choice == "auto":
        table = _fastest(device, timing_shapes, compiled, timing_timeout_s)
    else:
        table = _forced(choice, device.type, compiled)
    dispatch.set_table(table)
    # every module the table names is imported now: an import inside a compiled block (the first
    # forward of a fresh process under --compile) breaks its graph
    for backend in {REFERENCE, *table.values()}:
        dispatch.backend_module(backend, device.type, report=logging.INFO)
    log.info("kernels: %s", ", ".join(f"{op}={b}" for op, b in table.items()))
    return dict(table)


def traceable(backend: str, op: str, device_type: str) -> bool:
    module = dispatch.backend_module(backend, device_type, report=logging.INFO)
    return module is not None and dispatch.compile_safe(module, op)


def _forced(choice: str, device_type: str, compiled: bool) -> dict[str, str]:
    module = dispatch.backend_module(choice, device_type)
    table, untraceable = {}, []
    for op in OPERATIONS:
        if not dispatch.provides(module, op):
            table[op] = REFERENCE
        elif compiled and op in IN_COMPILED_BLOCKS and not dispatch.compile_safe(module, op):
            table[op] = REFERENCE
            untraceable.append(op)
        else:
            table[op] = choice
    if untraceable:
        log.info("--compile: the compiled blocks run the reference's %s (torch.compile cannot trace %r's)",
                 ", ".join(untraceable), choice)
    return table


def _fastest(device: torch.device, shapes: dict | None, compiled: bool, timeout_s: float) -> dict[str, str]:
    if device.type == "cpu":
        return {op: REFERENCE for op in OPERATIONS}
    candidates = {}
    for op in OPERATIONS:
        found = dispatch.available(op, device.type)
        if compiled and op in IN_COMPILED_BLOCKS:
            found = [b for b in found if traceable(b, op, device.type)]
        candidates[op] = found
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    table = None
    if not distributed or dist.get_rank() == 0:
        table = measure_isolated(candidates, device, shapes, timeout_s)
    if distributed:
        # timings differ a little from rank to rank, and one rank timing is enough: every rank
        # runs what rank 0 measured fastest
        shared = [table]
        dist.broadcast_object_list(shared, src=0)
        table = shared[0]
    if table is None:  # a process group that carries nothing (a fake one)
        table = {op: REFERENCE for op in OPERATIONS}
    return table


@contextlib.contextmanager
def use_backends(choice: str | dict[str, str], device: torch.device | str = "cpu"):
    """Run a block with another table (tests and benchmarks): `with use_backends("triton"): ...`,
    or `use_backends({"rms_norm": "triton"})` for some operations only."""
    with dispatch.override({}):
        if isinstance(choice, dict):
            dispatch.set_table(choice)
        else:
            configure(choice, device)
        yield dispatch.selected()
