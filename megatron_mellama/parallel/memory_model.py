"""Peak memory per GPU of one rank of a layout, predicted from the shapes alone (for planning).

The figures count the tensors the engine creates, as the dry run (`pretrain --dry-run`,
`training/dry_run.py`) traces them; `benchmarks/memory.py` and `tests/test_memory_model.py` hold
this model to the trace. Per rank, in bytes, with P the parameters of the rank's pipeline
stages (its TP share; norms are not split) and N the ranks a sharded data-parallel mode splits
them over (data x context parallel: context-parallel ranks hold the same parameters):

    weights      4 P / N        fp32 master weights (N = 1 for `none`)
    gradients    4 P / N        fp32, reduced every micro-batch (`full`, and `optimizer` with
                                --no-reduce-grads-once-per-step); 4 P once per step (`optimizer`'s
                                default: whole until the last micro-batch)
    optimizer    8 P / N        AdamW's two moments
    gathered     2 P            the bf16 compute weights (`none`, `optimizer`; a single process's
                                autocast copies too); `full` holds the output layer's and three
                                layers' (running, prefetched, and the all-gather's buffer)
    activations  per layer and micro-batch (below) x layers x micro-batches in flight
    temporaries  backward's working set: one layer's weight gradients in bf16 and fp32 (two
                 layers' with virtual stages), and one chunk of the loss's logits

Activations of one layer for a micro-batch of b sequences of s tokens, width h, B = b*s*h, in
bf16 (fp32 runs double the 2-byte terms), with g = 1/TP under sequence parallelism (the
residual stream is split along the sequence) and 1 without, r = key/value heads / heads,
f = ffn / h, t = TP:

    none       B * (12 g + 4 + (4 + 4 r) / t + 8 f / t)
               two norms keep an fp32 and a bf16 copy of their input (6 bytes each); the
               all-gathered (or, without SP, the normalised) inputs of q/k/v and of gate/up
               (2 + 2); q and k after RoPE, v and the attention output (2 (2 + 2 r), over t);
               gate, SiLU(gate), up and their product (8 f, over t)
    selective  what the engine's policy saves (`parallel/recompute.py`: matmul, attention and
               collective outputs): B * (2 g + 4 + 2 (1 + 2 r) / t + 2 / t + 4 f / t + 2 (2 - ...))
               -- see `layer_activation_bytes` for the exact sum
    full       B * 2 g, the layer's input; the layer being recomputed adds its `none` figure once

The attention core is SDPA's flash/memory-efficient kernel (on the CPU, its flash kernel), which
keeps a logsumexp per head and token, not the scores. Under selective recompute, an attention
call the policy cannot see (`--kernel-backend te`, or flex attention for packed documents on a
GPU, with or without CP) is kept whole from the forward, with its own q and k after RoPE:
+ 2 (1 + r) / t (under CP only q: its keys are the gathered ones, already kept). The dry
run traces the torch reference and does not see this term (an estimate; `auto` picking TE's
attention on a GPU adds it too, which the planner cannot know).

Context parallelism over C ranks (`parallel/context.py`): s is the rank's s / C tokens, and
attention keeps q, each chunk's output and their concatenation, and the keys and values of the
whole sequence all-gathered for backward: 2 (3 + 2 r C) / t in place of 2 (2 + 2 r) / t
(selective keeps the gathered keys and values too, a collective's output). The lower-right causal
mask is a flag to the GPU's kernels, no tensor (the dry run traces it so). Model state is as
without it, the sharded modes splitting it over dp x C.

Micro-batches in flight: 1 without PP (each micro-batch runs forward and backward before the
next); 1F1B's stage i holds min(PP - i, n) micro-batches' activations; the interleaved
schedule's rank r holds the forward chunks of its warm-up, (v - 1) * PP + 2 (PP - 1 - r), plus
one, each of L / (PP v) layers. A pipeline stage also keeps each in-flight micro-batch's input and
output (2 x 2 g B). The last stage adds the fused loss: the gathered final hidden state, the fp32
output-layer gradient (vocabulary x h / t x 4 bytes) held to backward, and one chunk of logits.

A layout fits when its peak is within 90% of the card: the rest goes to the CUDA context, NCCL
buffers and allocator fragmentation, none of which is a tensor.

Step time: training FLOPs per step / (GPUs x peak x efficiency), times the recompute overhead,
the pipeline bubble (1 + (PP - 1) / (v micro-batches)) and rough, assumed (not measured)
communication penalties: 5% per doubling of TP, inside one NVLink node, and 5% per doubling of
CP for its per-layer key/value all-gather, not overlapped with compute. Data-parallel reduction
is assumed overlapped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..config import Config, ModelConfig
from ..model.flops import layer_matmul_params, training_flops_per_token
from .pipeline import stage_indices, stages_per_rank

GIB = 2 ** 30
# of the card: the rest goes to the CUDA context, communication buffers and allocator fragmentation
USABLE_FRACTION = 0.9
TP_PENALTY_PER_DOUBLING = 0.05
CP_PENALTY_PER_DOUBLING = 0.05
PARTS = ("weights", "gathered", "gradients", "optimizer", "activations", "temporaries")
# logits elements per chunk of the fused loss (kernels/fused_loss.py)
LOSS_CHUNK_ELEMENTS = 1 << 24


@dataclass
class Prediction:
    rank: int
    stage: int
    parts: dict[str, float]  # bytes, by PARTS

    @property
    def total_bytes(self) -> float:
        return sum(self.parts.values())


@dataclass
class Estimate:
    """The heavier rank of a layout, in GiB, and the step time (what `plan_layout` lists)."""

    tp: int
    pp: int
    dp: int
    microbatches: int
    weights_gb: float
    grads_gb: float
    optimizer_gb: float
    gathered_gb: float
    activations_gb: float
    temporaries_gb: float
    total_gb: float
    fits: bool
    step_s: float
    cp: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


# -- the layout's shape ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    tp: int
    pp: int
    dp: int  # ranks that read different micro-batches
    shards: int  # ranks a sharded DP mode splits a parameter over: dp_shard x cp (1 for `none`)
    v: int  # stages per pipeline rank
    sharding: str
    sequence_parallel: bool
    recompute: str
    micro_batch: int
    seq: int
    microbatches: int
    compute_bytes: int  # 2 for bf16/fp16, 4 for fp32
    mixed: bool  # bf16/fp16 compute weights exist beside the fp32 master weights
    whole_grads: bool = False  # a sharded mode keeps whole fp32 gradients through the micro-batches
    cp: int = 1
    # selective recompute keeps an attention call its policy cannot see (Transformer Engine's, or
    # flex attention for packed documents on a GPU) with its own saved q and k after RoPE
    kept_attention: bool = False

    @property
    def local_seq(self) -> int:
        """Tokens of a sequence on one rank: context parallelism splits it."""
        return self.seq // self.cp

    @classmethod
    def of(cls, cfg: Config) -> "_Layout":
        p, world = cfg.parallel, cfg.parallel.world_size
        tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
        dp = world // (tp * pp * cp)
        # context-parallel ranks hold the same parameters: the sharded modes split them over dp x cp
        shards = 1 if p.data_parallel_sharding == "none" else dp // p.data_parallel_replicate_size * cp
        v = stages_per_rank(cfg.model.num_layers, pp, p.num_layers_per_virtual_pipeline_stage, p.pipeline_schedule)
        low = cfg.train.bf16 or cfg.train.fp16
        return cls(tp=tp, pp=pp, dp=dp, shards=shards, v=v,
                   sharding=p.data_parallel_sharding, sequence_parallel=p.sequence_parallel and tp > 1,
                   recompute=p.recompute_granularity or "none", micro_batch=cfg.train.micro_batch_size,
                   seq=cfg.seq_length, microbatches=cfg.num_microbatches, compute_bytes=2 if low else 4,
                   mixed=low,
                   whole_grads=shards > 1 and p.reduce_grads_once_per_step and cfg.num_microbatches > 1, cp=cp,
                   kept_attention=cfg.data.reset_attention_mask or (cp == 1 and cfg.train.kernel_backend == "te"))


def _stages(lay: _Layout, pp_rank: int) -> list[int]:
    return stage_indices(pp_rank, lay.pp, lay.v)


def _holds_loss(lay: _Layout, pp_rank: int) -> bool:
    """Whether the rank runs the last stage (the output layer and the loss)."""
    return lay.pp * lay.v - 1 in _stages(lay, pp_rank)


def _rank_layers(m: ModelConfig, lay: _Layout) -> int:
    """Decoder layers on one pipeline rank, over all its (virtual) stages."""
    return m.num_layers // lay.pp


def layer_parameters(m: ModelConfig, tp: int) -> float:
    """One layer's parameters on one TP rank (the two norms are whole on every rank)."""
    return layer_matmul_params(m) / tp + 2 * m.hidden_size


def rank_parameters(m: ModelConfig, lay: _Layout, pp_rank: int) -> float:
    count = _rank_layers(m, lay) * layer_parameters(m, lay.tp)
    if 0 in _stages(lay, pp_rank):
        count += m.padded_vocab_size * m.hidden_size / lay.tp
    if _holds_loss(lay, pp_rank):
        count += m.padded_vocab_size * m.hidden_size / lay.tp + m.hidden_size
    return count


# -- activations -----------------------------------------------------------------------------------
def layer_activation_bytes(m: ModelConfig, lay: _Layout, recompute: str | None = None) -> float:
    """Stored activations of one layer for one micro-batch (module doc), in bytes."""
    recompute = recompute or lay.recompute
    t, e = lay.tp, lay.compute_bytes
    B = lay.micro_batch * lay.local_seq * m.hidden_size
    sp = lay.sequence_parallel
    g = 1 / t if sp else 1.0
    r = m.kv_heads / m.num_attention_heads
    f = m.ffn_size / m.hidden_size
    if recompute == "full":
        return e * g * B
    # matmul inputs every TP rank sees whole: the all-gathered (or, without SP, normalised) inputs
    gathered_inputs = 2 * e
    if recompute == "selective":
        # kept: matmul, attention and collective outputs and the layer's input; recomputed: the
        # norms, RoPE, SiLU x up (parallel/recompute.py)
        qkv, out = e * (1 + 2 * r) / t, e / t
        partial = 2 * e if sp else 0.0  # o_proj's and down_proj's outputs before their reduce-scatter
        kv_gathered = 2 * e * r * lay.cp / t if lay.cp > 1 else 0.0  # a collective's output: kept
        # under CP the kept call's keys are the gathered ones, counted above
        kept_rope = e * (1 + (r if lay.cp == 1 else 0.0)) / t if lay.kept_attention else 0.0
        return B * (gathered_inputs + qkv + out + partial + 2 * e * g + 2 * e * f / t + e * g + kv_gathered
                    + kept_rope)
    # two norms: an fp32 copy and the normalised value each; under SP their sharded outputs stay
    # referenced by the all-gather's autograd node
    norms = 2 * (4 + e) * g + (2 * e * g if sp else 0.0)
    attention = e * (2 + 2 * r) / t  # q and k after RoPE, v, and the attention output
    if lay.cp > 1:
        # q, each chunk's attention output and their concatenation, and the keys and values of the
        # whole sequence (cp times the rank's tokens) gathered for the chunks' attention
        attention = e * 3 / t + 2 * e * r * lay.cp / t
    mlp = 4 * e * f / t  # gate, SiLU(gate), up and their product
    return B * (norms + gathered_inputs + attention + mlp)


def _in_flight(lay: _Layout, pp_rank: int) -> float:
    """Layers' worth of micro-batch activations alive at the rank's peak, over its layers."""
    n = lay.microbatches
    if lay.pp == 1:
        return 1.0
    if lay.v == 1:
        return min(lay.pp - pp_rank, n)
    # torch's interleaved 1F1B: warm-up forwards (chunks of L / (PP v) layers), then one more
    rounds = max(1, n // lay.pp)
    per_round = n // rounds
    warmup = min((lay.v - 1) * per_round + 2 * (lay.pp - 1 - pp_rank), n * lay.v)
    return min(warmup + 1, n * lay.v) / lay.v


def activation_bytes(m: ModelConfig, lay: _Layout, pp_rank: int) -> float:
    layers = _rank_layers(m, lay)
    in_flight = _in_flight(lay, pp_rank)
    B = lay.micro_batch * lay.local_seq * m.hidden_size
    g = 1 / lay.tp if lay.sequence_parallel else 1.0
    total = in_flight * layers * layer_activation_bytes(m, lay)
    if lay.recompute == "full":  # the layer recomputed in backward holds all of its activations
        total += layer_activation_bytes(m, lay, "none")
    if lay.pp > 1:
        total += in_flight * lay.v * 2 * lay.compute_bytes * g * B  # each stage's input and output
    if _holds_loss(lay, pp_rank):
        total += loss_bytes(m, lay)
    return total


def loss_bytes(m: ModelConfig, lay: _Layout) -> float:
    """The last stage's fused loss, forward to backward: final norm, gathered hidden state, the
    fp32 output-layer gradient and the hidden-state gradient."""
    B = lay.micro_batch * lay.local_seq * m.hidden_size
    g = 1 / lay.tp if lay.sequence_parallel else 1.0
    norm = (4 + lay.compute_bytes) * g * B
    gathered = lay.compute_bytes * B
    weight_grad = 4 * m.padded_vocab_size * m.hidden_size / lay.tp
    hidden_grad = 4 * g * B
    return norm + gathered + weight_grad + hidden_grad


def temporary_bytes(m: ModelConfig, lay: _Layout, pp_rank: int) -> float:
    """Backward's working set at the peak: a layer's weight gradients in the compute dtype and their
    fp32 copy for the reduction (two layers' when a rank runs several stages), and one chunk of
    logits of the loss with its fp32 gradient. Where the peak is the end of a forward (no pipeline,
    or a 1F1B stage without the loss, nothing recomputed), backward frees a layer's activations
    while it makes these: only what exceeds them raises the peak."""
    layers = 2 if lay.v > 1 else 1
    # a layer's gradients in the compute dtype, and their fp32 copy unless they are added straight
    # into whole fp32 gradients (DDP, --reduce-grads-once-per-step)
    fp32_copy = 0 if lay.whole_grads or lay.shards == 1 else 4
    grads = layers * (lay.compute_bytes + fp32_copy) * layer_parameters(m, lay.tp)
    ends_forward = lay.pp == 1 or not _holds_loss(lay, pp_rank)
    if ends_forward and lay.v == 1 and lay.recompute == "none":
        grads = max(0.0, grads - layers * layer_activation_bytes(m, lay, "none"))
    chunk = min(LOSS_CHUNK_ELEMENTS, lay.micro_batch * lay.local_seq * m.padded_vocab_size / lay.tp) * (4 + 2)
    return grads + chunk


# -- model state -------------------------------------------------------------------------------------
def model_state_bytes(m: ModelConfig, tp: int, pp: int, dp: int, sharding: str, stage: int = 0) -> dict:
    """fp32 weights, fp32 grads and AdamW state of one rank of `stage` (1F1B placement), in bytes."""
    lay = _Layout(tp=tp, pp=pp, dp=dp, shards=dp if sharding != "none" else 1, v=1, sharding=sharding,
                  sequence_parallel=False, recompute="none", micro_batch=1, seq=1, microbatches=1,
                  compute_bytes=4, mixed=False)
    params = rank_parameters(m, lay, stage)
    return dict(weights=4 * params / lay.shards, grads=4 * params / lay.shards, optimizer=8 * params / lay.shards)


def gathered_bytes(m: ModelConfig, lay: _Layout, pp_rank: int, params: float) -> float:
    """The compute-dtype weights held at the peak; `params`: the rank's (rank_parameters)."""
    if not lay.mixed:
        return 0.0
    if lay.sharding == "full" and lay.shards > 1:
        # at the peak: the layer running, the next one's all-gather in flight (forward or backward
        # prefetch) and its output buffer, and the output layer
        output = m.padded_vocab_size * m.hidden_size / lay.tp if _holds_loss(lay, pp_rank) else 0
        return lay.compute_bytes * (output + min(3, _rank_layers(m, lay)) * layer_parameters(m, lay.tp))
    return lay.compute_bytes * params


# -- a rank, a layout ---------------------------------------------------------------------------------
def predict_rank(cfg: Config, rank: int) -> Prediction:
    """The predicted peak of global rank `rank` of the run `cfg` was validated for, by part."""
    m, lay = cfg.model, _Layout.of(cfg)
    pp_rank = rank // (lay.tp * lay.cp * lay.dp)
    params = rank_parameters(m, lay, pp_rank)
    parts = dict(weights=4 * params / lay.shards,
                 gathered=gathered_bytes(m, lay, pp_rank, params),
                 # whole gradients until the last micro-batch; the shards exist only after it
                 gradients=4 * params if lay.whole_grads else 4 * params / lay.shards,
                 optimizer=8 * params / lay.shards,
                 activations=activation_bytes(m, lay, pp_rank),
                 temporaries=temporary_bytes(m, lay, pp_rank))
    return Prediction(rank=rank, stage=pp_rank, parts=parts)


def heaviest(cfg: Config) -> Prediction:
    """The rank with the largest predicted peak: one of the first and last pipeline stage."""
    lay = _Layout.of(cfg)
    ranks = {0, (lay.pp - 1) * lay.tp * lay.cp * lay.dp}
    return max((predict_rank(cfg, r) for r in sorted(ranks)), key=lambda p: p.total_bytes)


def step_seconds(cfg: Config, gpus: int, peak_tflops: float, efficiency: float) -> float:
    m, lay = cfg.model, _Layout.of(cfg)
    seq, global_batch = lay.seq, cfg.train.global_batch_size
    flops = training_flops_per_token(m, seq) * global_batch * seq
    if lay.recompute == "full":  # one more forward
        flops *= 4 / 3
    elif lay.recompute == "selective":  # the norms and elementwise work again: small
        flops *= 1.02
    ideal = flops / (gpus * peak_tflops * 1e12 * efficiency)
    bubble = 1 + (lay.pp - 1) / (lay.microbatches * lay.v)
    return (ideal * bubble * (1 + TP_PENALTY_PER_DOUBLING * math.log2(lay.tp))
            * (1 + CP_PENALTY_PER_DOUBLING * math.log2(lay.cp)))


def estimate(cfg: Config, *, gpu_memory_gb: float, peak_tflops: float, efficiency: float = 0.45) -> Estimate:
    """The heavier of the first and last pipeline stage of `cfg`'s layout, and its step time."""
    lay, worst = _Layout.of(cfg), heaviest(cfg)
    gb = {k: v / GIB for k, v in worst.parts.items()}
    total = worst.total_bytes / GIB
    return Estimate(lay.tp, lay.pp, lay.dp, lay.microbatches, weights_gb=gb["weights"], grads_gb=gb["gradients"],
                    optimizer_gb=gb["optimizer"], gathered_gb=gb["gathered"], activations_gb=gb["activations"],
                    temporaries_gb=gb["temporaries"], total_gb=total,
                    fits=total <= USABLE_FRACTION * gpu_memory_gb,
                    step_s=step_seconds(cfg, cfg.parallel.world_size, peak_tflops, efficiency), cp=lay.cp)


__all__ = ["Estimate", "Prediction", "estimate", "predict_rank", "heaviest", "model_state_bytes",
           "layer_activation_bytes", "activation_bytes", "step_seconds", "PARTS"]
