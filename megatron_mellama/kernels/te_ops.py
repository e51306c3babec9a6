"""The `te` backend: NVIDIA Transformer Engine's fused attention and fused RoPE.

Importing this module fails where Transformer Engine is not installed; the dispatcher then reports
the backend missing once and uses the reference. Norm, SwiGLU and the loss are not taken from TE
(its norm and activation are fused into its own Linear modules, which this model does not use), so
they stay with the reference, or with Triton when `auto` finds it faster.

CI has no GPU and no Transformer Engine: this adapter has not run there. Its layouts follow TE's
documented `bshd` format; `benchmarks/kernels.py --check` compares it with the reference on a GPU.
"""

from __future__ import annotations

import functools

import torch
import transformer_engine.pytorch as te

try:  # moved in Transformer Engine 2.x
    from transformer_engine.pytorch.attention.rope import apply_rotary_pos_emb
except ImportError:
    from transformer_engine.pytorch.attention import apply_rotary_pos_emb


@functools.lru_cache(maxsize=None)
def _attention_module(heads: int, kv_heads: int, head_dim: int) -> te.DotProductAttention:
    return te.DotProductAttention(heads, head_dim, num_gqa_groups=kv_heads, attention_dropout=0.0,
                                  attn_mask_type="causal", qkv_format="bshd")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    batch, heads, seq, head_dim = q.shape
    module = _attention_module(heads, k.shape[1], head_dim)
    # TE takes (batch, seq, heads, head_dim) and returns (batch, seq, heads * head_dim)
    out = module(*(t.transpose(1, 2).contiguous() for t in (q, k, v)))
    return out.view(batch, seq, heads, head_dim).transpose(1, 2)


def apply_rotary_qk(q, k, cos, sin):
    seq = q.shape[2]
    # TE rotates by angles (rotate-half layout, as ours): recover them from the tables
    freqs = torch.atan2(sin[:seq], cos[:seq]).view(seq, 1, 1, -1)
    return tuple(apply_rotary_pos_emb(t.transpose(1, 2), freqs, tensor_format="bshd", fused=True).transpose(1, 2)
                 for t in (q, k))
