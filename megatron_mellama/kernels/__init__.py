"""The hot operations of LLaMA2, each with one entry point and several backends.

The model calls the entry points here (`ops.py`); `configure(--kernel-backend, device, ...)`
(`choice.py`) decides once per run which backend runs each of them, `dispatch.py` holds that table
and loads the backends, and `autotune.py` times them for `auto` on the run's inputs
(`workload.py`). Backends: `torch` (`reference.py`, the reference and the contract), `triton`
(`triton_ops.py`), Transformer Engine (`te_ops.py`) and apex (`apex_ops.py`). The output layer and
loss are one chunked operation (`fused_loss.py`) whose per-chunk kernels are dispatched the same way.
"""

from __future__ import annotations

from ..config.sections import KERNEL_BACKENDS as KERNEL_BACKEND_CHOICES
from .choice import configure, use_backends
from .dispatch import OPERATIONS, selected
from .fused_loss import IGNORE_INDEX, linear_cross_entropy
from .ops import apply_rotary_qk, attention, document_mask, rms_norm, swiglu
from .workload import run_shapes

__all__ = ["KERNEL_BACKEND_CHOICES", "OPERATIONS", "IGNORE_INDEX", "configure", "selected", "use_backends",
           "run_shapes", "rms_norm", "apply_rotary_qk", "swiglu", "attention", "document_mask",
           "linear_cross_entropy"]
