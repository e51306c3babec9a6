"""Activation checkpointing and torch.compile, per DecoderLayer, keeping parameter names.

Both act on each layer in place (its `forward`, or its compiled call), never by wrapping it in
another module, so "layers.3.mlp.up_proj.weight" stays the name in checkpoints and TP/FSDP plans.
Apply them after tensor parallel and before data parallel.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

GRANULARITIES = ("full", "selective")


def _saved_ops() -> set:
    """Ops whose outputs selective recompute keeps: the FLOP-heavy ones, and collectives (a
    collective recomputed in backward is a second round of communication)."""
    aten, funcol = torch.ops.aten, torch.ops._c10d_functional
    names = ["mm", "addmm", "bmm", "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"]
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    for n in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_to_all_single"):
        if hasattr(funcol, n):
            ops.add(getattr(funcol, n).default)
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
    context_fn = _selective_context if granularity == "selective" else None
    for layer in module.layers.values():
        layer.forward = _checkpointed(layer.forward, context_fn)
    return module


def _checkpointed(forward, context_fn):
    kwargs = dict(use_reentrant=False)
    if context_fn is not None:
        kwargs["context_fn"] = context_fn

    @functools.wraps(forward)
    def run(*args, **kw):
        return checkpoint(forward, *args, **kwargs, **kw)

    return run


def apply_compile(module: nn.Module, fullgraph: bool = True) -> nn.Module:
    """torch.compile each DecoderLayer in place (`nn.Module.compile`: names unchanged); returns `module`.

    Every layer has the same code, so they share one compiled graph; compiling whole layers rather
    than the model keeps FSDP's per-layer hooks and the pipeline split outside the graphs.
    """
    for layer in module.layers.values():
        layer.compile(fullgraph=fullgraph)
    return module
