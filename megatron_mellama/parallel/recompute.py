"""Activation checkpointing and torch.compile, per DecoderLayer, keeping parameter names.

Both act on each layer in place (its `forward`, or its compiled call), never by wrapping it in
another module, so "layers.3.mlp.up_proj.weight" stays the name in checkpoints and TP/FSDP plans.
Apply them after tensor parallel and before data parallel.

Selective recompute decides op by op, from what torch's dispatcher shows its policy (`_saved_ops`).
Two attention kernels show it nothing: Transformer Engine's fused attention (C++ extension calls)
and, in a layer that is not compiled, flex attention compiled on its own (inductor's kernels). Their
calls are kept instead (`_KeptAttention`): in the forward they run outside the policy's dispatch
mode, keep their own saved tensors (their inputs, output and softmax statistics, as without
recompute), and the recompute in backward takes the kept output instead of running them again.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .. import torch_private
from ..kernels import dispatch
from ..model.llama import CausalAttention
from .context import ContextParallelAttention

log = logging.getLogger(__name__)

GRANULARITIES = ("full", "selective")


def _saved_ops() -> set:
    """Ops whose outputs selective recompute keeps: the FLOP-heavy ones, and collectives (a
    collective recomputed in backward is a second round of communication)."""
    aten, funcol = torch.ops.aten, torch_private.c10d_functional_ops()
    names = ["mm", "addmm", "bmm", "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"]
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    for n in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_to_all_single"):
        if hasattr(funcol, n):
            ops.add(getattr(funcol, n).default)
    # flex attention as one op: traced into a compiled layer's graph, or run eagerly
    flex = getattr(torch.ops.higher_order, "flex_attention", None)
    if flex is not None:
        ops.add(flex)
    return ops


def _selective_context():
    saved = _saved_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(module: nn.Module, granularity: str) -> nn.Module:
    """Recompute activations of each DecoderLayer in `module.layers` during backward; returns `module`.

    full: keep only each layer's input; recompute the whole layer (least memory, ~1/3 more compute).
    selective: keep matmul and attention outputs and recompute the cheap elementwise work around them
    (norms, RoPE, SiLU x up), which holds much of the activation memory for little of the compute.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"recompute granularity must be one of {GRANULARITIES}, not {granularity!r}")
    selective = granularity == "selective"
    for layer in module.layers.values():
        if selective:
            _keep_opaque_attention(layer)
        layer.forward = _checkpointed(layer.forward, selective)
    return module


def _checkpointed(forward, selective: bool):
    kwargs = dict(use_reentrant=False)

    @functools.wraps(forward)
    def run(*args, **kw):
        if not selective:
            return checkpoint(forward, *args, **kwargs, **kw)
        if torch.compiler.is_compiling():
            # a compiled layer: the policy applies to the graph, where flex attention is one op
            return checkpoint(forward, *args, context_fn=_selective_context, **kwargs, **kw)
        region = _Region()
        return checkpoint(region.runs(forward), *args, context_fn=region.contexts, **kwargs, **kw)

    return run


# -- attention calls the selective policy cannot see ---------------------------------------------------
class _Region:
    """One selective-recompute call of a layer: its dispatch modes, and the outputs its kept
    attention calls made in the forward, in order, for the recompute to take."""

    def __init__(self):
        self.saving_mode = None
        self.kept: collections.deque = collections.deque()
        self.recomputing = False
        self._runs = 0

    def contexts(self):
        saving, serving = _selective_context()
        self.saving_mode = saving
        return saving, serving

    def runs(self, forward):
        """`forward`, with this region current while it runs: once in the forward, again when
        backward recomputes it."""

        def body(*args, **kwargs):
            self.recomputing = self._runs > 0
            self._runs += 1
            _regions().append(self)
            try:
                return forward(*args, **kwargs)
            finally:
                _regions().pop()

        return body


_local = threading.local()  # backward recomputes on autograd's device threads


def _regions() -> list:
    if not hasattr(_local, "regions"):
        _local.regions = []
    return _local.regions


def _current_region() -> _Region | None:
    regions = _regions()
    return regions[-1] if regions else None


class _KeptAttention:
    """`CausalAttention.forward` for selective recompute: a call whose kernel the policy cannot see
    is kept from the forward rather than run again in the recompute."""

    def __init__(self, forward, context_parallel: bool = False):
        self.forward = forward
        self.context_parallel = context_parallel

    def __call__(self, q, k, v, documents=None):
        if torch.compiler.is_compiling():  # in a compiled layer's graph the policy sees flex attention
            return self.forward(q, k, v, documents)
        region = _current_region()
        if region is None or not _opaque_to_the_policy(q, documents, self.context_parallel):
            return self.forward(q, k, v, documents)
        if region.recomputing:
            return _take_kept(region)
        if not torch.is_grad_enabled() or torch_private.current_dispatch_mode() is not region.saving_mode:
            return self.forward(q, k, v, documents)
        with torch_private.pop_mode_temporarily():
            if documents is not None and not compile_runs_outside_selective_mode():
                # flex attention would run uncompiled and hold every score: the tiled path instead
                _report_tiled_fallback()
                documents = documents._replace(block_mask=None)
            # its saved tensors stay as they are, out of the checkpoint's reach
            with torch.autograd.graph.saved_tensors_hooks(_same, _same):
                out = self.forward(q, k, v, documents)
        region.kept.append((out.detach(), out.requires_grad))
        return out


def _same(t):
    return t


def _take_kept(region: _Region) -> torch.Tensor:
    out, requires_grad = region.kept.popleft()
    # the recompute's graph only feeds saved tensors to the forward's graph; the kept output stands
    # in for the call with the same autograd shape (o_proj saves its weight only if its input needs a gradient)
    return out.detach().requires_grad_(requires_grad)


def _opaque_to_the_policy(q: torch.Tensor, documents, context_parallel: bool) -> bool:
    if documents is not None:
        return documents.block_mask is not None  # flex attention, compiled by itself
    # context parallelism's causal attention is SDPA after an all-gather: both seen by the policy
    return not context_parallel and dispatch.implementation("attention", q) is not dispatch.reference_for(q)


def _keep_opaque_attention(layer: nn.Module) -> None:
    attend = getattr(getattr(layer, "self_attn", None), "attend", None)
    # under context parallelism packed documents run flex attention over the gathered keys: kept
    # whole, all-gather included (its backward, a reduce-scatter, stays in the kept graph)
    if type(attend) in (CausalAttention, ContextParallelAttention):
        attend.forward = _KeptAttention(attend.forward, context_parallel=type(attend) is ContextParallelAttention)


@functools.cache
def compile_runs_outside_selective_mode() -> bool:
    """Whether torch.compile compiles a function called with selective recompute's dispatch mode
    stepped out of (as a kept flex attention call is). Dynamo runs a frame uncompiled under a
    dispatch mode it does not ignore; on a torch where that covers this situation, compiled flex
    attention would silently run as eager flex, which materialises (batch, heads, seq, seq) scores."""
    def probe(x):
        return x + 1 if torch.compiler.is_compiling() else x

    fresh = type(probe)(probe.__code__.replace(), {"torch": torch, "__builtins__": __builtins__})  # nothing cached yet
    compiled = torch.compile(fresh, backend="eager", dynamic=False)
    saving, _ = _selective_context()
    with saving, torch_private.pop_mode_temporarily():
        return bool(compiled(torch.zeros(1)).item() == 1)


@functools.cache
def _report_tiled_fallback() -> None:
    log.warning("selective recompute: torch %s does not compile flex attention here; packed documents "
                "use the tiled attention path (bounded memory, slower)", torch.__version__)


def apply_compile(module: nn.Module, fullgraph: bool = True) -> nn.Module:
    """torch.compile each DecoderLayer in place (`nn.Module.compile`: names unchanged); returns `module`.

    Every layer has the same code, so they share one compiled graph; compiling whole layers rather
    than the model keeps FSDP's per-layer hooks and the pipeline split outside the graphs.
    """
    for layer in module.layers.values():
        layer.compile(fullgraph=fullgraph)
    return module
