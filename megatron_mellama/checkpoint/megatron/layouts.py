"""The tensor layouts Megatron-LM uses for LLaMA, to and from ours (Hugging Face's).

- QKV is one matrix, its rows grouped per key/value head ("query group"): for each group g, the
  rows of its heads/groups query heads, then its key head, then its value head. Megatron's RoPE
  rotates halves by default (`rotary_interleaved` false), as ours does: no row permutation.
- SwiGLU's `linear_fc1` (legacy `dense_h_to_4h`) is [gate; up]. Tensor parallelism splits each
  half: TP rank r holds [gate_r; up_r], so the ranks' tensors are not simply concatenated.
- QKV shards hold whole query groups, so concatenating the ranks' rows gives the global layout.
- Row-parallel matrices (linear_proj / dense, linear_fc2 / dense_4h_to_h) are split along columns;
  the embedding and output layer along rows (the padded vocabulary); norms are replicated.
"""

from __future__ import annotations

import torch

from .names import TP_SPLIT


def split_qkv(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's fused QKV [groups * (heads/groups + 2) * head_dim, hidden] -> q, k, v."""
    per_group = heads // groups + 2
    head_dim = qkv.shape[0] // (groups * per_group)
    w = qkv.reshape(groups, per_group, head_dim, -1)
    q = w[:, :per_group - 2].reshape(heads * head_dim, -1)
    k = w[:, per_group - 2].reshape(groups * head_dim, -1)
    v = w[:, per_group - 1].reshape(groups * head_dim, -1)
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """The inverse of `split_qkv`."""
    head_dim = k.shape[0] // groups
    cols = q.shape[1]
    parts = (q.reshape(groups, heads // groups, head_dim, cols), k.reshape(groups, 1, head_dim, cols),
             v.reshape(groups, 1, head_dim, cols))
    return torch.cat(parts, dim=1).reshape(-1, cols)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


def merge_tp(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The global tensor of canonical tensor `name` from its tensor-parallel ranks' tensors, in rank order."""
    how = TP_SPLIT[name]
    if how == "replicated" or len(parts) == 1:
        return parts[0]
    if how == "rows":
        return torch.cat(parts, dim=0)
    if how == "columns":
        return torch.cat(parts, dim=1)
    halves = [p.chunk(2, dim=0) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def split_tp(name: str, tensor: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Tensor-parallel rank `rank`'s share of the global tensor of canonical tensor `name`."""
    how = TP_SPLIT[name]
    if how == "replicated" or tp == 1:
        return tensor
    if how == "rows":
        return tensor.chunk(tp, dim=0)[rank]
    if how == "columns":
        return tensor.chunk(tp, dim=1)[rank]
    gate, up = tensor.chunk(2, dim=0)
    return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)


def padded_vocab(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's `_vocab_size_with_padding`: `vocab` rounded up to a multiple of divisible_by x TP."""
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple
