"""Tensor and sequence parallelism for the LLaMA2 model, as Megatron-LM partitions it.

q/k/v and gate/up are column-parallel (each rank computes its heads / its slice of the FFN), o
and down are row-parallel (partial sums reduced). The embedding and the output layer are
vocabulary-parallel; the output stays sharded over the vocabulary and the loss is computed with
`loss_parallel`, so the full logits never exist on one rank.

With sequence parallelism the residual stream and the norms are sharded along the sequence
between blocks: the all-reduce after o/down becomes a reduce-scatter, and the all-gather moves to
the block inputs, saving activation memory by the TP degree.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard a `Llama` (or a pipeline stage of one) over `tp_mesh`, in place.

    `model(tokens, labels)` computes the loss vocabulary-parallel; `model(tokens)` returns logits as
    a DTensor sharded on the vocabulary (use `loss_parallel()` for a loss over those).
    """
    if tp_mesh.size() == 1:
        return
    residual = Shard(1) if sequence_parallel else Replicate()
    top = {}
    if model.embed_tokens is not None:
        top["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
    if model.norm is not None and sequence_parallel:
        top["norm"] = SequenceParallel()
    if model.lm_head is not None:
        top["lm_head"] = ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(model, tp_mesh, top)

    for layer in model.layers.values():
        plan = {
            # (x, cos, sin, documents): the rotary tables and the documents cover the whole sequence
            "self_attn": PrepareModuleInput(input_layouts=(residual, None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None)),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=residual),
            "mlp": PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=residual),
        }
        if sequence_parallel:
            plan["input_layernorm"] = SequenceParallel()
            plan["post_attention_layernorm"] = SequenceParallel()
        parallelize_module(layer, tp_mesh, plan)
