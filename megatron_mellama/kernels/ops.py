"""The entry points the model calls: each runs its operation with the backend the table names
(`dispatch.implementation`). Their contract, in plain PyTorch, is `reference.py`."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate

from ..torch_private import async_collective_tensor_type
from . import documents as packed_documents
from .dispatch import implementation, reference_for


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * normalise(x), statistics in fp32. Under autocast the result has the autocast dtype
    (the compute dtype); otherwise weight's and x's promoted dtype (bf16 x bf16 gives bf16).

    Every backend returns the promoted dtype (`reference.py`); the cast to the compute dtype is
    made here, once for all of them. Without it, fp32 weights under autocast would make the norm
    fp32: each projection reading it (q, k, v, gate, up) would keep its own bf16 copy for
    backward, and sequence-parallel gathers would move fp32.
    """
    if isinstance(x, DTensor) and _sequence_parallel_norm_fits(x, weight):
        return _sequence_parallel_norm(x, weight, eps)
    return _to_compute_dtype(implementation("rms_norm", x).rms_norm(x, weight, eps))


def _to_compute_dtype(out: torch.Tensor) -> torch.Tensor:
    device_type = out.device.type
    # meta tensors (a model built on the meta device) have no autocast state
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        if out.dtype != dtype:
            return out.to(dtype)
    return out


def _sequence_parallel_norm_fits(x, weight) -> bool:
    return (isinstance(weight, DTensor) and weight.device_mesh == x.device_mesh and x.device_mesh.ndim == 1
            and weight.placements == (Replicate(),) and x.placements[0].is_shard(dim=1))


def _sequence_parallel_norm(x: DTensor, weight: DTensor, eps: float) -> DTensor:
    # Sequence parallelism hands the norm a sequence shard and the replicated weight. The norm is
    # row-local, so the kernel runs on the shard; each rank's weight gradient covers its rows
    # only, hence Partial: summed over the group when the gradient reaches the weight.
    local = x.to_local()
    if isinstance(local, async_collective_tensor_type()):
        # the shard of a reduce-scatter still in flight: a kernel needs its memory. Any op waits
        # for it; wait() itself would return a tensor cut off from autograd
        local = local.clone()
    out = implementation("rms_norm", local).rms_norm(local, weight.to_local(grad_placements=[Partial()]), eps)
    return DTensor.from_local(_to_compute_dtype(out), x.device_mesh, x.placements, run_check=False)


def apply_rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate-half RoPE of q (batch, heads, seq, head_dim) and k (batch, kv_heads, seq, head_dim).

    cos/sin are the whole tables (rows, head_dim), or per token (batch, seq, head_dim) where
    positions restart within a sequence; the backends' kernels take whole tables only, so per-token
    tables go to the reference."""
    module = implementation("rotary", q) if cos.dim() == 2 else reference_for(q)
    return module.apply_rotary_qk(q, k, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    return implementation("swiglu", gate).swiglu(gate, up)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              documents: packed_documents.Documents | None = None) -> torch.Tensor:
    """Causal attention; k/v may have fewer heads than q (grouped-query attention). With `documents`
    (`document_mask`), within each packed document only: no backend's kernel takes that mask, so
    those calls run flex attention or the tiled torch path (`documents.py`)."""
    if documents is not None:
        return packed_documents.attention(q, k, v, documents)
    return implementation("attention", q).attention(q, k, v)


def document_mask(document_ids: torch.Tensor) -> packed_documents.Documents:
    """The attention mask of packed documents, from each token's document id (batch, seq); made once
    per forward, never a (seq, seq) tensor."""
    return packed_documents.document_mask(document_ids)
