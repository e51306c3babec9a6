"""Output layer and cross-entropy in one pass over token chunks: the full logits never exist.

`linear_cross_entropy(hidden, weight, labels)` is `F.cross_entropy(hidden @ weight.T, labels,
reduction="sum")` for hidden (..., H), weight (V, H). It computes the logits of `chunk_tokens`
tokens at a time and, when gradients are wanted, turns each chunk's logits into their gradient in
place right away and folds it into the hidden-state and weight gradients (as Liger-Kernel's fused
linear cross-entropy): peak memory is one chunk of logits instead of the full (tokens x vocabulary)
logits, their fp32 copy and their gradient, and no output-layer matmul is repeated. Backward only
scales the two gradients by the incoming one. The weight gradient (fp32, the weight's size) is
therefore held from the forward to the backward of the last stage, which in every schedule follow
each other closely.

Vocabulary-parallel under tensor parallelism (as Megatron-LM's cross-entropy): when `weight` is a
DTensor sharded on the vocabulary, each rank computes logits for its rows only; the per-token
logsumexp and target logit are combined over the TP group (three all-reduces of one float per
token, per chunk), and the partial hidden-state gradients are summed over the group. With sequence
parallelism the hidden states arrive sharded on the sequence and are gathered first.

The chunk's logsumexp and gradient come from the selected kernel backend (`cross_entropy`
operation); the matmuls are cuBLAS/torch in the autocast dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from .dispatch import implementation

IGNORE_INDEX = -100
# logits elements per chunk: 2^24 x 4 bytes = 64 MiB of fp32 (524 tokens of LLaMA2's 32,000-token
# vocabulary), an eighth of a 4096-token sequence's logits, and still a matmul of tens of GFLOPs
CHUNK_ELEMENTS = 1 << 24


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         ignore_index: int = IGNORE_INDEX, chunk_tokens: int | None = None,
                         per_row: bool = False, row_sums: list | None = None) -> torch.Tensor:
    """Summed cross-entropy of the tokens whose label is not `ignore_index`; an fp32 scalar.

    `per_row=True` (without gradients: scoring, not training) sums each row of `labels` (its
    leading dim) apart instead: an fp32 tensor [labels.shape[0]], the same on every TP rank.
    `row_sums`, a list: the scalar is returned as usual (with its gradient) and each row's sum is
    appended to the list as well, without gradient (the training loss per domain)."""
    group, vocab_start, seq_group = None, 0, None
    row_ids, num_rows = None, None
    if per_row and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        raise RuntimeError("linear_cross_entropy(per_row=True) has no backward: call it under torch.no_grad()")
    if per_row or row_sums is not None:
        shape, num_rows = labels.shape, labels.shape[0]
        row_ids = torch.arange(shape[0], device=labels.device).view(-1, *[1] * (len(shape) - 1)).expand(shape)
    if isinstance(weight, DTensor):
        weight, group, vocab_start = _vocab_shard(weight)
    if isinstance(hidden, DTensor):
        sharded = _sequence_shard(hidden, group)
        if sharded is not None:
            # gathered inside the autograd function, its gradient reduce-scattered back there
            hidden, seq_group, labels = sharded[0], group, _rank_major(labels, *sharded[1:])
            if row_ids is not None:
                # each token keeps its row through the gathered order
                row_ids = _rank_major(row_ids, *sharded[1:])
        else:
            # every rank needs every token against its vocabulary rows (or the whole vocabulary)
            hidden = hidden.redistribute(placements=[Replicate()] * hidden.device_mesh.ndim).to_local()
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    if row_ids is not None:
        row_ids = row_ids.reshape(-1).to(hidden.device)
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_ELEMENTS // weight.shape[0])
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk_tokens, compute_dtype,
                                     group, vocab_start, with_grad, seq_group, row_ids, num_rows, row_sums)


def _sequence_shard(hidden: DTensor, group) -> tuple[torch.Tensor, int, int] | None:
    """(local shard, sharded dim, TP size) when `hidden` is evenly sharded on a sequence dim over the
    vocabulary's TP group (and replicated elsewhere); None for any other layout (the generic path)."""
    if group is None:
        return None
    mesh, placements = hidden.device_mesh, hidden.placements
    sharded = [i for i, p in enumerate(placements) if not isinstance(p, Replicate)]
    if len(sharded) != 1 or not isinstance(placements[sharded[0]], Shard):
        return None
    dim, size = placements[sharded[0]].dim, mesh.size(sharded[0])
    dim = dim % hidden.ndim
    seq_group = mesh.get_group(sharded[0])
    if (dim == hidden.ndim - 1 or hidden.shape[dim] % size
            or dist.get_process_group_ranks(seq_group) != dist.get_process_group_ranks(group)):
        return None
    return hidden.to_local(), dim, size


def _rank_major(labels: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """`labels` (the hidden states' shape less the last dim) in the order of the gathered token
    rows: rank by rank, each rank's sequence slice in its local order."""
    shape = labels.shape
    split = shape[:dim] + (size, shape[dim] // size) + shape[dim + 1:]
    return labels.reshape(split).movedim(dim, 0).reshape(-1)


def _collective(name: str, legacy: str):
    # torch 2.13 names them `*_single` (the `*_tensor` spellings warn); earlier releases have only those
    return getattr(dist, name, None) or getattr(dist, legacy)


def _vocab_shard(weight: DTensor) -> tuple[torch.Tensor, dist.ProcessGroup, int]:
    mesh, placements = weight.device_mesh, weight.placements
    dims = [i for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim == 0]
    if len(dims) != 1 or any(not isinstance(p, (Replicate, Shard)) for p in placements):
        raise ValueError(f"the output layer's weight must be sharded on the vocabulary over one mesh "
                         f"dimension, not {placements}")
    local = weight.to_local()
    rank = mesh.get_local_rank(dims[0])
    # DTensor's Shard(0) gives every rank the same number of rows when the padded vocabulary
    # divides by the TP size, which the configuration checks
    return local, mesh.get_group(dims[0]), rank * local.shape[0]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_tokens, compute_dtype, group, vocab_start,
                with_grad, seq_group=None, row_ids=None, num_rows=None, row_sums=None):
        local_hidden = hidden
        if seq_group is not None:
            # every rank's sequence slice, rank after rank (the labels were put in this order)
            size = dist.get_world_size(seq_group)
            hidden = torch.empty((size * local_hidden.shape[0], local_hidden.shape[1]), dtype=local_hidden.dtype,
                                 device=local_hidden.device)
            _collective("all_gather_single", "all_gather_into_tensor")(hidden, local_hidden.contiguous(),
                                                                         group=seq_group)
        ops = implementation("cross_entropy", hidden)
        dtype = compute_dtype or torch.promote_types(hidden.dtype, weight.dtype)
        w = weight.to(dtype)
        local_labels = labels - vocab_start
        valid = (labels != ignore_index).float()
        # one sum, or one per row of the labels (row_ids: each token's row); with `row_sums` both
        per_row = row_ids is not None and row_sums is None
        total = torch.zeros((num_rows,) if per_row else (), dtype=torch.float32, device=hidden.device)
        rows_total = None if row_sums is None else torch.zeros((num_rows,), dtype=torch.float32, device=hidden.device)
        # fp32: backward multiplies by the incoming gradient, which carries fp16's loss scale
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if with_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_grad else None
        # the weight gradient is accumulated a block of vocabulary rows at a time, added into fp32 in
        # place: the product never exists whole (it would be as large as the weight)
        block = max(1, CHUNK_ELEMENTS // hidden.shape[1])
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                h = hidden[rows].to(dtype)
                logits = h @ w.t()
                lse, target = _logsumexp_and_target(ops, logits, local_labels[rows], group)
                token_loss = (lse - target) * valid[rows]
                if per_row:
                    total += _sum_per_row(token_loss.float(), row_ids[rows], num_rows)
                else:
                    total += token_loss.sum()
                if rows_total is not None:
                    rows_total += _sum_per_row(token_loss.float(), row_ids[rows], num_rows)
                if with_grad:
                    # the gradient of the summed loss, now, while the chunk's logits exist: backward
                    # then only scales it (no second pass over the output layer)
                    grad_logits = ops.cross_entropy_grad(logits, lse, local_labels[rows], valid[rows]).to(dtype)
                    grad_hidden[rows] = grad_logits @ w
                    for v in range(0, grad_weight.shape[0], block):
                        grad_weight[v:v + block] += grad_logits[:, v:v + block].t() @ h
                del logits
        if with_grad and seq_group is not None:
            # each rank's vocabulary rows contribute a part of every token's gradient; each rank needs
            # the sum for its own sequence slice only
            full, grad_hidden = grad_hidden, torch.empty(local_hidden.shape, dtype=torch.float32,
                                                         device=hidden.device)
            _collective("reduce_scatter_single", "reduce_scatter_tensor")(grad_hidden, full, group=seq_group)
            del full
        elif with_grad and group is not None:
            # each rank's vocabulary rows contribute a part of every token's gradient
            dist.all_reduce(grad_hidden, group=group)
        if row_sums is not None:
            row_sums.append(rows_total)
        ctx.grads = (grad_hidden, grad_weight, hidden.dtype, weight.dtype)
        ctx.scaled = False
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, hidden_dtype, weight_dtype = ctx.grads
        if grad_hidden is None:
            raise RuntimeError("linear_cross_entropy ran without gradients (torch.no_grad) and cannot backward")
        # scaled in place, once: a copy would double the weight-sized buffer. The zero-bubble schedule
        # runs this backward twice with the same incoming gradient (input, then weight gradients);
        # the second call returns the same, already scaled, gradients
        if not ctx.scaled:
            grad_hidden.mul_(grad_loss)
            grad_weight.mul_(grad_loss)
            ctx.scaled = True
        return (grad_hidden.to(hidden_dtype), grad_weight.to(weight_dtype), None, None, None, None, None, None,
                None, None, None, None, None)


def _sum_per_row(values: torch.Tensor, row_ids: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(num_rows,) sums of `values` by their row: each row's values are laid out on its own line of
    a (num_rows, chunk) buffer and summed along it. An `index_add_` would accumulate with atomics on
    CUDA, in an order that changes from run to run (scores differing in their last bits between two
    evaluations of one checkpoint). The buffer holds one value per row and chunk token: smaller
    than the chunk's logits while there are fewer rows than vocabulary entries."""
    mine = row_ids.unsqueeze(0) == torch.arange(num_rows, device=row_ids.device).unsqueeze(1)
    return torch.where(mine, values.unsqueeze(0), 0.0).sum(dim=1)


def _logsumexp_and_target(ops, logits, local_labels, group):
    """Each token's logsumexp over the whole vocabulary and its target logit (0 when ignored)."""
    vocab = logits.shape[1]
    lse = ops.logsumexp_rows(logits)
    inside = (local_labels >= 0) & (local_labels < vocab)
    picked = logits.gather(1, local_labels.clamp(0, vocab - 1).unsqueeze(1)).squeeze(1)
    target = torch.where(inside, picked.float(), 0.0)
    if group is not None:
        lse = _combine_logsumexp(lse, group)
        dist.all_reduce(target, group=group)
    return lse, target


def _combine_logsumexp(lse: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """logsumexp over the whole vocabulary from each rank's logsumexp over its rows."""
    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    total = torch.exp(lse - top)
    dist.all_reduce(total, group=group)
    return top + torch.log(total)
