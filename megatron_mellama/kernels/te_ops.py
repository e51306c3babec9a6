"""The `te` backend: NVIDIA Transformer Engine's fused attention and fused RoPE.

Importing this module fails where Transformer Engine is not installed; the dispatcher then reports
the backend missing once and uses the reference. Norm, SwiGLU and the loss are not taken from TE
(its norm and activation are fused into its own Linear modules, which this model does not use), so
they stay with the reference, or with Triton when `auto` finds it faster.

- TE's fused and flash attention take fp16/bf16 q, k, v only; for fp32 (a run without autocast)
  TE falls back to its unfused attention, which materialises the (seq x seq) scores, so fp32
  attention is left to the reference's SDPA here.
- `DotProductAttention` is marked for dynamo to skip, so a `--compile` run (blocks compiled with
  `fullgraph=True`) does not take it: `COMPILE_SAFE` is empty.
- One `DotProductAttention` per (heads, kv_heads, head_dim, device) serves every layer: it holds
  no parameters, no dropout (0.0) and no fp8 state while fp8 is off, and its scale follows head_dim.
- TE's RoPE takes angles, not cos/sin tables: they are recovered once per table (atan2), not per call,
  with the tables' magnitude (YaRN's attention factor), which scales TE's rotated q and k.

CI has no GPU and no Transformer Engine: this adapter has run there only against stand-ins of TE's
functions (tests/test_kernels_adapters.py). Its layouts follow TE's documented `bshd` format;
`benchmarks/kernel_speed.py --check` compares it with the reference on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
import transformer_engine.pytorch as te

from . import reference

try:  # moved in Transformer Engine 2.x
    from transformer_engine.pytorch.attention.rope import apply_rotary_pos_emb
except ImportError:
    from transformer_engine.pytorch.attention import apply_rotary_pos_emb

COMPILE_SAFE = frozenset()

_FUSED_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _attention_module(heads: int, kv_heads: int, head_dim: int, device: torch.device) -> te.DotProductAttention:
    # made on the device it serves, whichever is current
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return te.DotProductAttention(heads, head_dim, num_gqa_groups=kv_heads, attention_dropout=0.0,
                                      attn_mask_type="causal", qkv_format="bshd")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if q.dtype not in _FUSED_DTYPES:
        return reference.attention(q, k, v)
    batch, heads, seq, head_dim = q.shape
    module = _attention_module(heads, k.shape[1], head_dim, q.device)
    # TE takes (batch, seq, heads, head_dim) and returns (batch, seq, heads * head_dim); the model's
    # q, k, v are transposed views of that layout already, so contiguous() copies nothing
    out = module(*(t.transpose(1, 2).contiguous() for t in (q, k, v)))
    return out.view(batch, seq, heads, head_dim).transpose(1, 2)


class _Rotation:
    """What TE's RoPE takes for a pair of cos/sin tables: their angles, (rows, 1, 1, head_dim) fp32,
    and their magnitude. Tables that carry an attention factor (YaRN's: cos and sin both multiplied
    by it) rotate and scale; TE only rotates, so the rotated q and k are multiplied by the factor
    here, as the reference's products with the tables do.

    Derived again only when the tables are other tensors or were written to. The model hands every
    layer the same tables (`rope.tables_in`), so this runs once per run and table, and reads the
    magnitude on the host then: one synchronisation per table, none per call."""

    SLOTS = 4  # tables alive at once: one pair per model chunk on this rank

    def __init__(self):
        self.entries: list[tuple] = []
        self.misses = 0

    def __call__(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, object]:
        for key, rotation in self.entries:
            cos_ref, sin_ref, versions = key
            if cos_ref() is cos and sin_ref() is sin and versions == (cos._version, sin._version):
                return rotation
        self.misses += 1
        rotation = _rotation(cos, sin)
        key = (weakref.ref(cos), weakref.ref(sin), (cos._version, sin._version))
        self.entries = [(key, rotation)] + self.entries[:self.SLOTS - 1]
        return rotation


def _rotation(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, object]:
    """(angles, scale): scale None for unit tables, a float for one factor over the whole table
    (YaRN), else a (rows, 1, head_dim) fp32 tensor."""
    cos32, sin32 = cos.float(), sin.float()
    # rotate-half tables: angle = atan2(sin, cos), equal to the original angle modulo 2 pi
    freqs = torch.atan2(sin32, cos32).view(cos.shape[0], 1, 1, -1)
    magnitude = torch.hypot(cos32, sin32)
    mean = magnitude.mean()
    mean, spread = torch.stack([mean, (magnitude - mean).abs().max()]).tolist()
    # cos and sin rounded to their dtype move each magnitude by up to half an ulp, relative
    eps = torch.finfo(cos.dtype).eps
    if spread > mean * eps + 1e-6:
        return freqs, magnitude.view(cos.shape[0], 1, -1)
    # one factor over the table; the mean of many rounded magnitudes is far closer to it than any one
    return freqs, None if abs(mean - 1) <= max(eps / 8, 1e-6) else mean


_rotations = _Rotation()


def apply_rotary_qk(q, k, cos, sin):
    seq = q.shape[2]
    freqs, scale = _rotations(cos, sin)
    out = []
    for t in (q, k):
        rotated = apply_rotary_pos_emb(t.transpose(1, 2), freqs[:seq], tensor_format="bshd", fused=True)
        out.append(_scaled(rotated, scale, seq).transpose(1, 2))
    return tuple(out)


def _scaled(rotated: torch.Tensor, scale, seq: int) -> torch.Tensor:
    # rotated: (batch, seq, heads, head_dim)
    if scale is None:
        return rotated
    if isinstance(scale, float):
        return rotated * scale  # computed in fp32, rounded once to rotated's dtype
    return (rotated.float() * scale[:seq]).to(rotated.dtype)
