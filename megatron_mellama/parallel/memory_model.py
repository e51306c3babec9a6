"""Per-GPU memory and step-time estimates for one TP x PP x DP layout (for planning, before a run).

Model state, per parameter of a rank's pipeline stage (its share under TP), as parallel/data.py
keeps it: 4 B fp32 master weight, 4 B fp32 gradient, 8 B AdamW state (exp_avg, exp_avg_sq);
`optimizer` and `full` sharding divide all three by DP. On top, the bf16 copies compute runs on
("gathered"): the whole stage for `none` and `optimizer`, about two layers plus the root's
embedding/output for `full`, which reshards after each layer's forward.

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", with sequence parallelism (it divides every term by TP t), per layer and
micro-batch of b sequences of length s, width h, a heads, in bytes:

    none       s*b*h*(34 + 5*a*s/h) / t
    selective  s*b*h*34 / t                (the 5*a*s/h attention-score term is recomputed)
    full       2*s*b*h / t                  (the layer input), plus one layer's `selective`
                                            figure while that layer is recomputed in backward

Our attention is SDPA, whose flash/memory-efficient kernels never store the scores, so on GPU
`none` behaves like `selective`; `none` keeps the paper's score term as an upper bound (SDPA's
math backend does store it). The paper's 34 is for a 4h GELU MLP with dropout; LLaMA's SwiGLU
and no dropout land close to it, so it is kept rather than re-derived.

1F1B keeps min(PP - i, micro-batches) micro-batches in flight on stage i: the first stage holds
the most activations, the last stage adds the logits (bf16 logits, their fp32 copy for the loss
and its fp32 gradient: 10 B per vocabulary entry of its TP shard). The heavier of the two is
reported.

Sizes are in GiB; a layout fits when its total is within 90 % of the card.

Step time: training FLOPs per step / (GPUs x peak x efficiency), times the recompute overhead,
the 1F1B bubble (1 + (PP - 1) / micro-batches) and a rough TP communication penalty (5 % per
doubling of TP, inside one NVLink node). Data-parallel gradient reduction is assumed overlapped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..config import ModelConfig
from ..model.flops import layer_matmul_params, training_flops_per_token

GIB = 2 ** 30
# of the card: the rest goes to the CUDA context, communication buffers and allocator fragmentation
USABLE_FRACTION = 0.9
TP_PENALTY_PER_DOUBLING = 0.05


@dataclass
class Estimate:
    tp: int
    pp: int
    dp: int
    microbatches: int
    weights_gb: float
    grads_gb: float
    optimizer_gb: float
    gathered_gb: float
    activations_gb: float
    total_gb: float
    fits: bool
    step_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def stage_parameters(m: ModelConfig, tp: int, pp: int, stage: int) -> float:
    """Parameters one rank of pipeline stage `stage` holds before DP sharding (norms are not TP-split)."""
    h, vocab = m.hidden_size, m.padded_vocab_size
    count = m.num_layers // pp * (layer_matmul_params(m) / tp + 2 * h)
    if stage == 0:
        count += vocab * h / tp
    if stage == pp - 1:
        count += vocab * h / tp + h
    return count


def model_state_bytes(m: ModelConfig, tp: int, pp: int, dp: int, sharding: str, stage: int = 0) -> dict:
    """fp32 weights, fp32 grads and AdamW state of one rank of `stage`, in bytes."""
    params = stage_parameters(m, tp, pp, stage)
    shards = dp if sharding in ("optimizer", "full") else 1
    return dict(weights=4 * params / shards, grads=4 * params / shards, optimizer=8 * params / shards)


def gathered_bytes(m: ModelConfig, tp: int, pp: int, sharding: str, stage: int) -> float:
    params = stage_parameters(m, tp, pp, stage)
    if sharding == "full":
        root = params - m.num_layers // pp * (layer_matmul_params(m) / tp + 2 * m.hidden_size)
        layers = min(2, m.num_layers // pp) * (layer_matmul_params(m) / tp + 2 * m.hidden_size)
        params = root + layers
    return 2 * params


def layer_activation_bytes(m: ModelConfig, seq: int, micro_batch: int, tp: int, recompute: str) -> float:
    """Stored activations of one layer for one micro-batch (module doc), in bytes."""
    sbh = seq * micro_batch * m.hidden_size
    if recompute == "full":
        return 2 * sbh / tp
    if recompute == "selective":
        return 34 * sbh / tp
    return sbh * (34 + 5 * m.num_attention_heads * seq / m.hidden_size) / tp


def activation_bytes(m: ModelConfig, seq: int, micro_batch: int, tp: int, pp: int, microbatches: int,
                     recompute: str, stage: int) -> float:
    in_flight = min(pp - stage, microbatches)
    total = in_flight * m.num_layers // pp * layer_activation_bytes(m, seq, micro_batch, tp, recompute)
    if recompute == "full":
        total += layer_activation_bytes(m, seq, micro_batch, tp, "selective")
    if stage == pp - 1:
        total += 10 * seq * micro_batch * m.padded_vocab_size / tp
    return total


def step_seconds(m: ModelConfig, seq: int, global_batch: int, gpus: int, tp: int, pp: int, microbatches: int,
                 recompute: str, peak_tflops: float, efficiency: float) -> float:
    flops = training_flops_per_token(m, seq) * global_batch * seq
    if recompute == "full":  # one more forward
        flops *= 4 / 3
    elif recompute == "selective":  # the attention core's forward again
        flops += m.num_layers * 4 * seq * m.num_attention_heads * m.head_dim * global_batch * seq
    ideal = flops / (gpus * peak_tflops * 1e12 * efficiency)
    bubble = 1 + (pp - 1) / microbatches
    return ideal * bubble * (1 + TP_PENALTY_PER_DOUBLING * math.log2(tp))


def estimate(m: ModelConfig, *, seq: int, micro_batch: int, global_batch: int, gpus: int, tp: int, pp: int,
             sharding: str, recompute: str, gpu_memory_gb: float, peak_tflops: float,
             efficiency: float = 0.45) -> Estimate:
    """The heavier of the first and last pipeline stage; `recompute` is none, selective or full."""
    dp = gpus // (tp * pp)
    microbatches = global_batch // (micro_batch * dp)
    worst = None
    for stage in sorted({0, pp - 1}):
        state = model_state_bytes(m, tp, pp, dp, sharding, stage)
        parts = [state["weights"], state["grads"], state["optimizer"], gathered_bytes(m, tp, pp, sharding, stage),
                 activation_bytes(m, seq, micro_batch, tp, pp, microbatches, recompute, stage)]
        if worst is None or sum(parts) > sum(worst):
            worst = parts
    gb = [x / GIB for x in worst]
    total = sum(gb)
    return Estimate(tp, pp, dp, microbatches, *gb, total_gb=total, fits=total <= USABLE_FRACTION * gpu_memory_gb,
                    step_s=step_seconds(m, seq, global_batch, gpus, tp, pp, microbatches, recompute,
                                        peak_tflops, efficiency))


__all__ = ["Estimate", "estimate", "model_state_bytes", "stage_parameters", "activation_bytes",
           "layer_activation_bytes", "step_seconds"]
