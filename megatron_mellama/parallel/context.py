"""Context parallelism (`--context-parallel-size C`): each sequence split over C ranks, attention exact.

Layout, as Megatron-LM's: the sequence is cut into 2C chunks and rank i holds chunks i and 2C-1-i.
Under causal attention an early chunk attends to few keys and a late one to many, so pairing them
gives every rank the same work. Everything but attention is per token and runs on the rank's own
tokens; the loss is each rank's share, and gradients are reduced over data x context parallel
(`mesh.Meshes.dp_cp`), since context-parallel ranks hold the same parameters.

Attention: every layer all-gathers the keys and values of the whole sequence over the cp group
(after RoPE, before grouped-query expansion: kv_heads / TP heads), and the rank's queries attend
to those before them. The backward of the all-gather is a reduce-scatter of their gradients. This
is Megatron-LM's `--cp-comm-type allgather`, chosen over a ring of key/value blocks because it is
one attention call per chunk, so it composes as it is with grouped-query attention, document
masking (`--reset-attention-mask`: causal within a document by global position) and every
attention backend, and its one collective per layer sits on the cp ranks' fast links (cp is
inside dp and pp in the rank layout). The price is memory: the gathered keys and values of the
whole sequence, 2 x seq x kv_heads / TP x head_dim per micro-batch and layer, kept for backward;
with LLaMA2-70B's 8 key/value heads that is small beside the activations. A ring would hold two
blocks and overlap the transfers with compute: the better choice for many key/value heads or
sequences far beyond 32k.

Without document masking, on CUDA, each chunk's attention is one `scaled_dot_product_attention`
over the keys up to the chunk's end with a lower-right-aligned causal mask (flash and
memory-efficient kernels take it without building it). With document masking, on CUDA, both
chunks are one flex attention call against the gathered keys, under a `BlockMask` of this rank's
queries at their global positions (causal by global position and within the document), built
once per micro-batch by the model's forward (`chunk_document_mask`) rather than per layer. On the
CPU, where flex attention has no backward, queries go tile by tile (`kernels.documents`), as
packed documents do without CP.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from .. import torch_private
from ..kernels import documents as packed_documents


_all_gather_autograd = torch_private.all_gather_autograd()


# Where scaled_dot_product_attention runs a lower-right causal mask in its fused kernels (flash,
# memory-efficient). Elsewhere (the CPU) it would build the chunk x keys mask as a float tensor,
# kept for backward in every layer, and compute the blocks it hides: there the queries go tile by
# tile (kernels/documents.py), at most one tile's (BLOCK x keys) mask at a time.
FUSED_LOWER_RIGHT_DEVICES = ("cuda",)


def _one_document(batch: int, seq_len: int, device) -> torch.Tensor:
    return torch.zeros(batch, seq_len, dtype=torch.long, device=device)


def chunk_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """The global positions of the tokens context-parallel rank `rank` holds: chunks rank and 2cp-1-rank."""
    chunk = seq_len // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat([first, second])


def split_micro_batch(tokens: torch.Tensor, labels: torch.Tensor, documents: dict, cp: int, rank: int) -> tuple:
    """This rank's share of a micro-batch (batch, seq): tokens, labels and position ids of its chunks.
    Position ids are always given (RoPE needs each token's own); document ids stay whole, since this
    rank's attention reads keys of the whole sequence."""
    held = chunk_positions(tokens.shape[1], cp, rank, tokens.device)
    positions = documents.get("position_ids")
    positions = held.expand(tokens.shape[0], -1) if positions is None else positions[:, held]
    local = dict(documents, position_ids=positions)
    return tokens[:, held], labels[:, held], local


def chunk_document_mask(document_ids: torch.Tensor, cp: int, rank: int) -> packed_documents.Documents:
    """What this rank's attention takes for packed documents: the whole sequence's document ids
    (batch, seq) and, where flex attention runs, the BlockMask of this rank's queries (its two
    chunks, at their global positions) against every key of the sequence."""
    held = chunk_positions(document_ids.shape[1], cp, rank, document_ids.device)
    return packed_documents.document_mask(document_ids, query_positions=held)


class ContextParallelAttention(nn.Module):
    """Causal attention of this rank's two chunks of queries over the keys of the whole sequence."""

    def __init__(self, group: dist.ProcessGroup, cp: int, rank: int, seq_length: int):
        super().__init__()
        self.group, self.cp, self.rank = group, cp, rank
        # built here, not per call: under torch.compile and selective recompute a tensor subclass
        # cannot be constructed inside the traced region
        chunk = seq_length // (2 * cp)
        self._causal = {end: causal_lower_right(chunk, end)
                        for end in ((rank + 1) * chunk, (2 * cp - rank) * chunk)}

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents=None) -> torch.Tensor:
        chunk = q.shape[2] // 2
        seq_len = 2 * self.cp * chunk
        k, v = (self._gather_in_order(t, seq_len) for t in (k, v))
        if documents is not None and documents.block_mask is not None:
            # both chunks in one call: the mask places them at their positions (chunk_document_mask)
            return packed_documents.attention_with_block_mask(q, k, v, documents.block_mask)
        gqa = k.shape[1] != q.shape[1]
        out = []
        for half, index in ((0, self.rank), (1, 2 * self.cp - 1 - self.rank)):
            start, end = index * chunk, (index + 1) * chunk
            q_chunk = q[:, :, half * chunk:(half + 1) * chunk]
            k_seen, v_seen = k[:, :, :end], v[:, :, :end]
            if documents is None and q.device.type in FUSED_LOWER_RIGHT_DEVICES:
                causal = self._causal[end] if end in self._causal else causal_lower_right(chunk, end)
                out.append(F.scaled_dot_product_attention(q_chunk, k_seen, v_seen, enable_gqa=gqa, attn_mask=causal))
            else:
                ids = documents.ids if documents is not None else _one_document(q.shape[0], seq_len, q.device)
                out.append(packed_documents.attention_by_tiles(q_chunk, k_seen, v_seen, ids, gqa, query_start=start))
        return torch.cat(out, dim=2)

    def _gather_in_order(self, t: torch.Tensor, seq_len: int) -> torch.Tensor:
        """(batch, heads, 2 chunks, dim) of every rank -> (batch, heads, seq, dim) in sequence order."""
        gathered = _all_gather_autograd(t.contiguous(), gather_dim=2, group=self.group)
        held = torch.cat([chunk_positions(seq_len, self.cp, r, t.device) for r in range(self.cp)])
        return gathered.index_select(2, torch.argsort(held))


def apply_context_parallel(model: nn.Module, cp_mesh, seq_length: int) -> nn.Module:
    """Give every attention layer of `model` (a Llama or a pipeline stage of it) the context-parallel
    attention over `cp_mesh` for sequences of `seq_length`; in place. The model then takes this
    rank's share of each sequence (`split_micro_batch`)."""
    group, cp, rank = cp_mesh.get_group(), cp_mesh.size(), cp_mesh.get_local_rank()
    for layer in model.layers.values():
        layer.self_attn.attend = ContextParallelAttention(group, cp, rank, seq_length)
    # the forward's one mask per micro-batch is the one of this rank's queries
    model.document_mask = functools.partial(chunk_document_mask, cp=cp, rank=rank)
    return model
