"""The `apex` backend: NVIDIA apex's fused RMSNorm.

Importing this module fails where apex (built with its CUDA extensions) is not installed; the
dispatcher then reports the backend missing once and uses the reference. Only the norm comes from
apex. CI has no GPU and no apex: this adapter has not run there; `benchmarks/kernels.py --check`
compares it with the reference on a GPU.
"""

from __future__ import annotations

import torch
from apex.normalization.fused_layer_norm import fused_rms_norm_affine


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    # apex wants one dtype; the weight is cast to the activations' (as apex's mixed-dtype norm does)
    out = fused_rms_norm_affine(x, weight.to(x.dtype), weight.shape, eps)
    return out.to(out_dtype)
