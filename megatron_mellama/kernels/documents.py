"""Causal attention within each packed document (`--reset-attention-mask`), without a (seq, seq) mask.

A sample that packs several documents lets each token attend to the earlier tokens of its own
document only. On CUDA this is flex attention (compiled) with a `BlockMask` described per tile of
BLOCK x BLOCK (query, key) positions, computed from each tile's first and last document id: it
costs O((seq / BLOCK)^2) memory, and the kernel skips the tiles no query attends to.
(`create_block_mask` would instead evaluate the mask function on every (query, key) pair, a dense
(batch, seq, seq) tensor, unless compiled.) Flex attention has no backward on the CPU, so there the
queries go tile by tile through scaled_dot_product_attention with that tile's (BLOCK, seq) mask,
each tile recomputed in backward rather than kept: at most one tile's scores exist at a time.

Everything here is tensor arithmetic on the device, with loops over counts that come from shapes:
no value is read by the host, so nothing synchronises with the device per micro-batch.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

BLOCK = 128  # flex attention's default tile
FLEX_DEVICE_TYPES = ("cuda",)  # where flex attention has a backward


class Documents(NamedTuple):
    """One micro-batch's packed documents, made once per forward and handed to every layer."""
    ids: torch.Tensor  # (batch, seq): each token's document, non-decreasing along the sequence
    block_mask: Optional[BlockMask]  # for flex attention, where it runs (FLEX_DEVICE_TYPES)


def document_mask(document_ids: torch.Tensor) -> Documents:
    """What `attention` needs for `document_ids` (`data.loader.document_ids_of`)."""
    uses_flex = document_ids.device.type in FLEX_DEVICE_TYPES
    return Documents(document_ids, document_block_mask(document_ids) if uses_flex else None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: Documents) -> torch.Tensor:
    """Causal attention within documents; q (batch, heads, seq, head_dim), k/v with kv_heads dividing heads."""
    gqa = k.shape[1] != q.shape[1]
    if documents.block_mask is not None:
        # inside a compiled layer, flex attention is traced into the layer's graph
        flex = flex_attention if torch.compiler.is_compiling() else _compiled_flex_attention()
        return flex(q, k, v, block_mask=documents.block_mask, enable_gqa=gqa)
    return attention_by_tiles(q, k, v, documents.ids, gqa)


@functools.cache
def _compiled_flex_attention():
    # uncompiled, flex attention materialises every score
    return torch.compile(flex_attention)


def attention_by_tiles(q, k, v, document_ids, gqa: bool, query_start: int = 0) -> torch.Tensor:
    """Causal attention within documents, BLOCK queries at a time. The queries are the sequence's
    positions [query_start, query_start + q's length) (a context-parallel chunk), the keys its
    positions from 0, `document_ids` those of the whole sequence."""
    out = []
    for start in range(0, q.shape[2], BLOCK):
        rows = min(start + BLOCK, q.shape[2]) - start
        # a query attends to keys up to itself only: the tile needs keys up to its last row
        end = query_start + start + rows
        out.append(checkpoint(_attend_tile, q[:, :, start:start + rows], k[:, :, :end], v[:, :, :end], document_ids,
                              query_start + start, gqa, use_reentrant=False))
    return torch.cat(out, dim=2)


def _attend_tile(q, k, v, document_ids, start: int, gqa: bool) -> torch.Tensor:
    end = k.shape[2]
    rows = torch.arange(start, end, device=q.device)
    cols = torch.arange(end, device=q.device)
    same_document = document_ids[:, start:end, None] == document_ids[:, None, :end]
    mask = (cols[None, :] <= rows[:, None]) & same_document
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1), enable_gqa=gqa)


def document_block_mask(document_ids: torch.Tensor, block: int = BLOCK) -> BlockMask:
    """The mask of causal attention within documents, for `document_ids` (batch, seq): each token's
    document, non-decreasing along the sequence (`data.loader.document_ids_of`)."""
    batch, seq = document_ids.shape
    padded = _pad_to_tiles(document_ids, block)
    tiles = padded.shape[1] // block
    per_tile = padded.view(batch, tiles, block)
    first, last = per_tile[..., 0], per_tile[..., -1]
    below_or_on = torch.ones(tiles, tiles, dtype=torch.bool, device=document_ids.device).tril()
    strictly_below = below_or_on.tril(-1)
    # ids only grow along the sequence, so an earlier key tile shares a document with a query tile
    # exactly when its last id reaches the query tile's first, and holds only the query tile's
    # single document when its first id equals the query tile's last
    touching = below_or_on & (last[:, None, :] >= first[:, :, None])
    full = strictly_below & (first[:, None, :] == last[:, :, None])
    if padded.shape[1] != seq:
        # a tile reaching past the sequence is partial, as create_block_mask makes it
        full = full & (torch.arange(tiles, device=document_ids.device) < tiles - 1)[:, None]
    partial = touching & ~full
    kv_num, kv_indices = _ordered(partial)
    full_num, full_indices = _ordered(full)

    def same_document_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (padded[b, q_idx] == padded[b, kv_idx])

    return BlockMask.from_kv_blocks(kv_num, kv_indices, full_num, full_indices, BLOCK_SIZE=block,
                                    mask_mod=same_document_causal, seq_lengths=(seq, seq))


def _pad_to_tiles(document_ids: torch.Tensor, block: int) -> torch.Tensor:
    # the last tile is filled with the last document: its extra rows and columns lie past the
    # sequence, where flex attention reads nothing, but the mask function may index them
    pad = -document_ids.shape[1] % block
    if not pad:
        return document_ids
    return torch.cat([document_ids, document_ids[:, -1:].expand(-1, pad)], dim=1)


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, q_tiles, kv_tiles) booleans -> flex attention's per-row count and key-tile indices,
    the tiles in use first, with a head dimension of 1 (the same mask for every head)."""
    as_int = tiles.to(torch.int32).unsqueeze(1)
    counts = as_int.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(as_int, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts, indices
