"""Timing backends for `--kernel-backend auto`: each candidate backend of each operation runs
forward and backward on inputs like the run's own (`workload.py`), and the fastest is kept. A
backend whose output differs from the reference's beyond its dtype's rounding is not timed (on
inputs whose rotary tables carry an attention factor, as YaRN's do, whatever the run's).

`measure_isolated` times in a spawned child process, which has its own CUDA context: a kernel that
faults (an illegal memory access leaves the process's CUDA context unusable, whatever Python
catches) or hangs costs only the child, and the run then takes the reference for every operation,
with a warning. A backend that raises an ordinary exception on these inputs is skipped and the
others are still timed. The cost is the child's start-up (importing torch, compiling the Triton
kernels) and a few hundred milliseconds per operation.
"""

from __future__ import annotations

import logging
import multiprocessing
import time

import torch

from . import dispatch
from .dispatch import REFERENCE
from .workload import check_shapes, workload

__all__ = ["DEFAULT_TIMEOUT_S", "TOLERANCE", "disagreement", "fastest", "measure", "measure_isolated",
           "time_backend"]

log = logging.getLogger(__name__)

# the child imports torch and JIT-compiles every Triton kernel it times before the first timing
DEFAULT_TIMEOUT_S = 300.0


def time_backend(op: str, backend: str, device: torch.device | str, shapes: dict | None, repeats: int = 5) -> float:
    """Median seconds of one forward+backward of `op` with `backend`."""
    device = torch.device(device)
    if dispatch.backend_module(backend, device.type) is None:
        # the table would fall back to the reference, which would then be timed under this name
        raise RuntimeError(f"kernel backend {backend!r} cannot run on {device.type} in this process")
    with dispatch.override({op: backend}):
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


# the largest difference from the reference's output a backend may show, relative to the
# reference's largest magnitude, by compute dtype: a few roundings of that dtype
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def disagreement(op: str, backend: str, device: torch.device | str, shapes: dict | None) -> float:
    """How far `backend`'s forward output of `op` is from the reference's, relative to the
    reference's largest magnitude, on the same inputs (`workload.check_shapes`)."""
    device = torch.device(device)
    shapes = check_shapes(shapes)
    outputs = []
    for b in (REFERENCE, backend):
        with dispatch.override({op: b}), torch.no_grad():
            forward, _ = workload(op, device, shapes, seed=1)
            outputs.append(forward().float())
    want, got = outputs
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def fastest(seconds: dict[str, float]) -> str:
    """The backend with the fewest seconds; the reference when none was timed."""
    return min(seconds, key=seconds.get, default=REFERENCE)


def measure(candidates: dict[str, list[str]], device: torch.device | str, shapes: dict | None = None,
            repeats: int = 5) -> dict:
    """Time every candidate backend of every operation, here, in this process.

    Returns `table` (operation -> fastest backend), `seconds` (operation -> backend -> median
    seconds) and `failures` (operation -> backend -> the exception it raised, or how far it is
    from the reference). An operation with one candidate is not timed."""
    device = torch.device(device)
    tolerance = TOLERANCE[check_shapes(shapes)["dtype"]]
    table, seconds, failures = {}, {}, {}
    for op, backends in candidates.items():
        if len(backends) <= 1:
            table[op] = backends[0] if backends else REFERENCE
            continue
        seconds[op], failures[op] = {}, {}
        for backend in backends:
            try:
                off = 0.0 if backend == REFERENCE else disagreement(op, backend, device, shapes)
                if not off <= tolerance:  # NaN too
                    failures[op][backend] = (f"its output differs from the torch reference's by {off:.1e} of its "
                                             f"largest magnitude (at most {tolerance:.0e} expected)")
                    continue
                seconds[op][backend] = time_backend(op, backend, device, shapes, repeats)
            except Exception as exc:  # a backend failing on these inputs must not stop the others
                failures[op][backend] = f"{type(exc).__name__}: {exc}"
                if not _usable(device):
                    raise RuntimeError(f"{backend}'s {op} left the CUDA context unusable: {exc}") from exc
        table[op] = fastest(seconds[op])
    if seconds and not _usable(device):  # a fault that surfaced in no timed call still voids the timings
        raise RuntimeError("the CUDA context is unusable after timing the kernels")
    return dict(table=table, seconds=seconds, failures=failures)


def measure_isolated(candidates: dict[str, list[str]], device: torch.device | str, shapes: dict | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S, repeats: int = 5) -> dict[str, str]:
    """`measure`'s table, timed in a spawned child process; the reference for every operation if
    the child dies, fails or gives no answer within `timeout_s` seconds. Logs the timings."""
    if all(len(backends) <= 1 for backends in candidates.values()):
        return {op: backends[0] if backends else REFERENCE for op, backends in candidates.items()}
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # the child's current device is not ours
        device = torch.device("cuda", torch.cuda.current_device())
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, name="kernel-timing",
                        args=(sender, dispatch.registered(), candidates, str(device), shapes, repeats))
    child.start()
    sender.close()  # the child holds the only writer: its end closing means it is gone
    result, why = None, None
    try:
        if receiver.poll(timeout_s):
            result = receiver.recv()
        else:
            why = f"no answer within {timeout_s:.0f} s"
    except EOFError:
        why = "it ended without an answer"
    finally:
        receiver.close()
        child.join(timeout=30 if result is not None else 1)
        if child.is_alive():
            child.kill()
            child.join()
    if result is not None and "error" in result:
        why, result = result["error"], None
    if result is None:
        log.warning("kernel timing failed in its child process (%s; exit code %s); every operation uses the "
                    "torch reference", why, child.exitcode)
        return {op: REFERENCE for op in candidates}
    _report(result)
    return result["table"]


def _child(sender, backends: dict, candidates: dict, device: str, shapes: dict | None, repeats: int) -> None:
    for name, spec in backends.items():
        dispatch.register_backend(name, spec.module, spec.device_types)
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    try:
        result = measure(candidates, device, shapes, repeats)
    except Exception as exc:
        result = dict(error=f"{type(exc).__name__}: {exc}")
    sender.send(result)
    sender.close()


def _report(result: dict) -> None:
    for op, failed in result["failures"].items():
        for backend, why in failed.items():
            log.warning("kernel backend %r failed on %s (%s); not using it", backend, op, why)
    for op, seconds in result["seconds"].items():
        ranked = sorted(seconds.items(), key=lambda item: item[1])
        log.info("%s: %s", op, ", ".join(f"{b} {t * 1e3:.2f} ms" for b, t in ranked))


def _usable(device: torch.device) -> bool:
    """False when the device's context has a sticky error (every later call on it would fail too)."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).item()
        return True
    except RuntimeError:
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
