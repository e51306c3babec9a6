"""Causal attention within each packed document (`--reset-attention-mask`), without a (seq, seq) mask.

A sample that packs several documents lets each token attend to the earlier tokens of its own
document only. On CUDA this is flex attention (compiled) with a `BlockMask` described per tile of
BLOCK x BLOCK (query, key) positions, computed from each tile's first and last document id and
position: it costs O((seq / BLOCK)^2) memory, and the kernel skips the tiles no query attends to.
The queries may be a subset of the sequence's positions, in increasing order: a context-parallel
rank's chunks (`parallel/context.py`) attend with their global positions to the whole sequence's
keys, so one flex call covers both chunks.
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
    ids: torch.Tensor  # (batch, seq): each token's document, non-decreasing along the whole sequence
    # for flex attention, where it runs (FLEX_DEVICE_TYPES): the forward's queries against every key
    block_mask: Optional[BlockMask]


def document_mask(document_ids: torch.Tensor, query_positions: Optional[torch.Tensor] = None) -> Documents:
    """What `attention` needs for `document_ids` (`data.loader.document_ids_of`), for queries at
    `query_positions` of the sequence (increasing; all of them when None)."""
    uses_flex = document_ids.device.type in FLEX_DEVICE_TYPES
    block_mask = document_block_mask(document_ids, query_positions=query_positions) if uses_flex else None
    return Documents(document_ids, block_mask)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: Documents) -> torch.Tensor:
    """Causal attention within documents; q (batch, heads, seq, head_dim), k/v with kv_heads dividing heads."""
    gqa = k.shape[1] != q.shape[1]
    if documents.block_mask is not None:
        return attention_with_block_mask(q, k, v, documents.block_mask)
    return attention_by_tiles(q, k, v, documents.ids, gqa)


def attention_with_block_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              block_mask: BlockMask) -> torch.Tensor:
    """Flex attention of q against k/v under `block_mask` (`document_block_mask` of these queries and keys)."""
    # inside a compiled layer, flex attention is traced into the layer's graph
    flex = flex_attention if torch.compiler.is_compiling() else _compiled_flex_attention()
    return flex(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


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


def document_block_mask(document_ids: torch.Tensor, block: int = BLOCK,
                        query_positions: Optional[torch.Tensor] = None) -> BlockMask:
    """The mask of causal attention within documents, for `document_ids` (batch, seq): each token's
    document, non-decreasing along the sequence (`data.loader.document_ids_of`). The queries are
    the sequence's positions `query_positions` (increasing, e.g. a context-parallel rank's chunks;
    all positions when None), the keys all of its positions.

    Any query and key count works: a last partial tile (of queries or keys) is never full, as
    create_block_mask makes it. A query tile may hold positions that are not contiguous (where a
    rank's two chunks meet inside a tile); it then lists every key tile some of its queries could
    read, and the mask function decides per element."""
    seq = document_ids.shape[1]
    device = document_ids.device
    positions = torch.arange(seq, device=device) if query_positions is None else query_positions
    query_ids = document_ids if query_positions is None else document_ids[:, query_positions]
    key_ids, query_ids = _pad_to_tiles(document_ids, block), _pad_to_tiles(query_ids, block)
    padded_positions = _pad_to_tiles(positions[None], block)[0]
    # ids and positions only grow along the queries and along the keys, so a tile's range is its
    # first and last element (the padding repeats the last one)
    q_first_id, q_last_id = (ids[:, :, None] for ids in _tile_ends(query_ids, block))
    k_first_id, k_last_id = (ids[:, None, :] for ids in _tile_ends(key_ids, block))
    q_first_pos, q_last_pos = (pos[0, :, None] for pos in _tile_ends(padded_positions[None], block))
    k_first_pos = torch.arange(0, key_ids.shape[1], block, device=device)
    k_last_pos = k_first_pos + block - 1
    # some query may read some key: a key at or before the tile's last query, of a document that
    # reaches the tile's first (a key tile before a query tile holds ids up to the query tile's)
    touching = (k_first_pos <= q_last_pos) & (k_last_id >= q_first_id)
    # every query reads every key: all keys at or before the first query, all of its one document
    full = (k_last_pos <= q_first_pos) & (k_first_id == q_last_id)
    full = full & _whole_tiles(positions.shape[0], block, device)[:, None] & _whole_tiles(seq, block, device)
    partial = touching & ~full
    kv_num, kv_indices = _ordered(partial)
    full_num, full_indices = _ordered(full)
    mask_mod = _same_document_causal(query_ids, key_ids, None if query_positions is None else padded_positions)
    return BlockMask.from_kv_blocks(kv_num, kv_indices, full_num, full_indices, BLOCK_SIZE=block,
                                    mask_mod=mask_mod, seq_lengths=(positions.shape[0], seq))


def _same_document_causal(query_ids: torch.Tensor, key_ids: torch.Tensor, query_positions: Optional[torch.Tensor]):
    """Flex attention's mask function; query_positions None: the queries are the sequence itself."""
    if query_positions is None:
        def same_document_causal(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (query_ids[b, q_idx] == key_ids[b, kv_idx])
    else:
        def same_document_causal(b, h, q_idx, kv_idx):
            return (kv_idx <= query_positions[q_idx]) & (query_ids[b, q_idx] == key_ids[b, kv_idx])
    return same_document_causal


def _tile_ends(values: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, tiles x block) -> each tile's first and last value, (rows, tiles) each."""
    per_tile = values.view(values.shape[0], -1, block)
    return per_tile[..., 0], per_tile[..., -1]


def _whole_tiles(length: int, block: int, device) -> torch.Tensor:
    """Per tile of `length` positions, whether it holds `block` of them (only the last may not)."""
    tiles = -(-length // block)
    last_is_partial = length % block != 0
    return torch.arange(tiles, device=device) < tiles - int(last_is_partial)


def _pad_to_tiles(values: torch.Tensor, block: int) -> torch.Tensor:
    # (rows, length) -> (rows, tiles x block), the last tile filled with the last value (document
    # or position): its extra rows and columns lie past the sequence, where flex attention reads
    # nothing, but the mask function may index them
    pad = -values.shape[1] % block
    if not pad:
        return values
    return torch.cat([values, values[:, -1:].expand(-1, pad)], dim=1)


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, q_tiles, kv_tiles) booleans -> flex attention's per-row count and key-tile indices,
    the tiles in use first, with a head dimension of 1 (the same mask for every head)."""
    as_int = tiles.to(torch.int32).unsqueeze(1)
    counts = as_int.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(as_int, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts, indices
