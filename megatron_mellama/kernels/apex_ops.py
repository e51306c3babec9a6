"""The `apex` backend: NVIDIA apex's fused RMSNorm.

Importing this module fails where apex (built with its CUDA extensions) is not installed; the
dispatcher then reports the backend missing once and uses the reference. Only the norm comes from
apex. CI has no GPU and no apex: this adapter has run there only against a stand-in of apex's
function (tests/test_kernels_adapters.py); `benchmarks/kernel_speed.py --check` compares it with the
reference on a GPU.
"""

from __future__ import annotations

import torch
from apex.normalization.fused_layer_norm import fused_rms_norm_affine

# apex's functions are autograd Functions over a C++ extension, outside dynamo's reach
COMPILE_SAFE = frozenset()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    # apex casts its inputs to the autocast dtype before the kernel sees them, so under bf16 autocast
    # the fp32 residual stream would be rounded to bf16 before the statistics are taken. With
    # autocast off it gets x as it is; it wants one dtype, so the weight takes x's.
    with torch.autocast(x.device.type, enabled=False):
        out = fused_rms_norm_affine(x, weight.to(x.dtype), weight.shape, eps)
    return out.to(out_dtype)
