"""The `torch` backend: every operation in plain PyTorch. It is the reference the other backends are
tested against, and the math the model had before kernels existed (Hugging Face's LLaMA2).

Shapes and dtypes, shared by every backend:
- `rms_norm(x, weight, eps)`: statistics in fp32, the normalised value rounded to x's dtype, then
  multiplied by the weight; a backend returns the promoted dtype of weight and x (fp32 weights and
  bf16 activations give fp32, as Hugging Face's RMSNorm does). The entry point `ops.rms_norm` then
  casts it to the autocast dtype when autocast is on, for every backend alike.
- `apply_rotary_qk(q, k, cos, sin)`: q (batch, heads, seq, head_dim), k (batch, kv_heads, seq,
  head_dim), any strides; cos/sin tables of at least seq rows, (rows, head_dim), rotate-half layout,
  fp32 or the compute dtype (what the model's layers take, `rope.tables_in`), either one possibly
  multiplied by an attention factor (YaRN's).
  The reference alone also takes per-token tables (batch, seq, head_dim), gathered at each token's
  position where positions restart (packed documents); `ops.apply_rotary_qk` sends those here.
- `swiglu(gate, up)`: silu(gate) * up.
- `attention(q, k, v)`: causal attention, q (batch, heads, seq, head_dim), k/v with kv_heads dividing heads.
- the two pieces of the chunked cross-entropy (see `fused_loss.py`): `logsumexp_rows(logits)` -> fp32
  (rows,), and `cross_entropy_grad(logits, lse, labels, scale)` -> d loss / d logits of
  sum_rows(scale_r * (lse_r - logits[r, labels_r])), where a label outside [0, columns) contributes
  no target term (it lives on another vocabulary shard, or is ignored). The result may reuse
  `logits`' storage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# plain aten operations: dynamo traces each of them into the compiled blocks' graphs
COMPILE_SAFE = frozenset({"rms_norm", "rotary", "swiglu", "attention", "cross_entropy"})


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # fp32 statistics: bf16 loses the small variances of early layers
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if cos.dim() == 3:
        # per token (batch, seq, head_dim): the same angle for every head
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    else:
        seq = x.shape[2]
        cos, sin = cos[:seq], sin[:seq]
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def apply_rotary_qk(q, k, cos, sin):
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # query head h reads key/value head h // (heads / kv_heads), as Hugging Face's repeat_kv
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def logsumexp_rows(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=-1)


def cross_entropy_grad(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor,
                       scale: torch.Tensor) -> torch.Tensor:
    # in place where the logits are fp32 already: the chunk's logits are the largest tensor here
    grad = logits.float().sub_(lse.unsqueeze(-1)).exp_()
    inside = (labels >= 0) & (labels < logits.shape[-1])
    # minus one at each row's own label (rows whose label another shard holds, or none, get -0):
    # a scatter, not a gather of the matching rows, whose count the host would have to read
    grad.scatter_add_(-1, torch.where(inside, labels, 0).unsqueeze(-1), -inside.to(grad.dtype).unsqueeze(-1))
    return grad.mul_(scale.unsqueeze(-1))
