"""What one rank of a run hands each operation, and inputs like them for timing and comparing backends.

The model (`model/llama.py`) under autocast, with fp32 parameters as the engine keeps them:
- the residual stream is the embedding's output, in the parameters' dtype (fp32); a residual add
  of a bf16 projection to it stays fp32. So both norms take fp32 (batch, seq, hidden) and an fp32
  weight; with sequence parallelism each rank's norm runs on its sequence shard, seq / TP rows.
- the projections run in the autocast dtype, so rotary takes bf16 q (batch, heads, seq, head_dim)
  and k, both transposed views of the projections' (batch, seq, heads, head_dim), with the whole
  cos/sin tables (max positions, head_dim) in the residual stream's dtype (`rope.tables_in`),
  multiplied by the run's attention factor (YaRN's; 1 otherwise); attention takes bf16 q, k, v laid out the same
  way; SwiGLU takes bf16 (batch, seq, ffn) gate and up. Heads and FFN are split over TP; the
  sequence is the rank's whole share (sequence parallelism gathers it before the projections):
  seq / CP tokens under context parallelism, for every operation.
- the loss takes the final norm's fp32 output, all tokens (gathered under sequence parallelism),
  and the fp32 output weight's vocabulary shard; its kernels see chunks of autocast-dtype logits.
Without autocast (an fp32 run) everything is fp32. If the parameters themselves are cast for
compute (`param_dtype`), the residual stream and the norm and output weights take that dtype.
"""

from __future__ import annotations

import torch

from .fused_loss import linear_cross_entropy
from .ops import apply_rotary_qk, attention, rms_norm, swiglu

# the ~1B shape, one 4096-token sequence, bf16 autocast over fp32 parameters
DEFAULT_SHAPES = dict(batch=1, seq=4096, norm_seq=4096, hidden=2048, heads=16, kv_heads=16, head_dim=128, ffn=5632,
                      vocab=32000, positions=4096, eps=1e-5, dtype=torch.bfloat16, param_dtype=torch.float32,
                      rope_attention_factor=1.0)
# YaRN's attention factor at scaling factor 4 (0.1 ln 4 + 1): what checks against the reference
# multiply the rotary tables by, so that a backend ignoring the tables' magnitude shows
CHECK_ROPE_ATTENTION_FACTOR = 1.1386294361119891


def check_shapes(shapes: dict | None) -> dict:
    """`shapes` for comparing a backend with the reference: rotary tables carrying an attention
    factor even where the run's do not."""
    s = {**DEFAULT_SHAPES, **(shapes or {})}
    if s["rope_attention_factor"] == 1.0:
        s["rope_attention_factor"] = CHECK_ROPE_ATTENTION_FACTOR
    return s


def run_shapes(cfg, tp: int = 1, sequence_parallel: bool | None = None,
               param_dtype: torch.dtype | None = None, cp: int | None = None) -> dict:
    """The shapes and dtypes one rank of a run hands the operations in one micro-batch.

    `tp`: the tensor-parallel size (heads, FFN and vocabulary are split over it).
    `sequence_parallel`: whether the norms see a sequence shard; None takes the configuration's
    `--sequence-parallel` (which means nothing at TP 1).
    `param_dtype`: the dtype the parameters are in when the model runs; None for the stored fp32
    parameters under autocast.
    `cp`: the context-parallel size; None takes the configuration's `--context-parallel-size`.
    A context-parallel rank holds seq / CP tokens of each sequence, and every operation runs on
    those (attention's queries; its keys are gathered whole, `parallel/context.py`).
    """
    m, t = cfg.model, cfg.train
    if sequence_parallel is None:
        sequence_parallel = cfg.parallel.sequence_parallel
    sequence_parallel = sequence_parallel and tp > 1
    if cp is None:
        cp = cfg.parallel.context_parallel_size
    if cfg.seq_length % cp:
        raise ValueError(f"--context-parallel-size {cp} needs --seq-length ({cfg.seq_length}) divisible by it")
    seq = cfg.seq_length // cp
    if sequence_parallel and seq % tp:
        raise ValueError(f"sequence parallelism needs the sequence length per context-parallel rank ({seq}) "
                         f"divisible by --tensor-model-parallel-size ({tp})")
    return dict(batch=t.micro_batch_size, seq=seq, norm_seq=seq // tp if sequence_parallel else seq,
                hidden=m.hidden_size, heads=m.num_attention_heads // tp, kv_heads=max(m.kv_heads // tp, 1),
                head_dim=m.head_dim, ffn=m.ffn_size // tp, vocab=m.padded_vocab_size // tp,
                positions=m.max_position_embeddings, eps=m.norm_epsilon,
                dtype=torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else torch.float32,
                param_dtype=param_dtype or torch.float32, rope_attention_factor=_rope_attention_factor(m))


def _rope_attention_factor(model_cfg) -> float:
    # imported here: the model package imports the kernels when it loads
    from ..model.rope import inverse_frequencies

    return inverse_frequencies(model_cfg)[1]


def workload(op: str, device: torch.device | str, shapes: dict | None, seed: int = 0):
    """`(forward, leaves)`: a call running `op` once, through the dispatched entry point, on inputs
    like the run's (see the module docstring), and the inputs that take gradients. The same seed
    gives the same inputs (to compare backends)."""
    device = torch.device(device)
    s = {**DEFAULT_SHAPES, **(shapes or {})}
    batch, seq, dtype, param_dtype = s["batch"], s["seq"], s["dtype"], s["param_dtype"]
    g = torch.Generator(device=device).manual_seed(seed)

    def make(*shape, dt=dtype, std=1.0):
        return (torch.randn(*shape, device=device, generator=g) * std).to(dt).requires_grad_()

    def heads_view(t):
        # the model's layout: (batch, heads, seq, head_dim) views of (batch, seq, heads, head_dim)
        return t.transpose(1, 2)

    if op == "rms_norm":
        x, w = make(batch, s["norm_seq"], s["hidden"], dt=param_dtype), make(s["hidden"], dt=param_dtype)
        return (lambda: rms_norm(x, w, s["eps"])), [x, w]
    if op == "swiglu":
        gate, up = make(batch, seq, s["ffn"]), make(batch, seq, s["ffn"])
        return (lambda: swiglu(gate, up)), [gate, up]
    if op == "rotary":
        q, k = make(batch, seq, s["heads"], s["head_dim"]), make(batch, seq, s["kv_heads"], s["head_dim"])
        angles = torch.rand(s["positions"], s["head_dim"] // 2, device=device, generator=g) * s["positions"]
        angles = torch.cat([angles, angles], dim=-1)
        factor = s["rope_attention_factor"]
        cos, sin = ((f(angles) * factor).to(param_dtype) for f in (torch.cos, torch.sin))

        def forward():
            rotated = apply_rotary_qk(heads_view(q), heads_view(k), cos, sin)
            return torch.cat([t.flatten() for t in rotated])
        return forward, [q, k]
    if op == "attention":
        q = make(batch, seq, s["heads"], s["head_dim"])
        k, v = make(batch, seq, s["kv_heads"], s["head_dim"]), make(batch, seq, s["kv_heads"], s["head_dim"])
        return (lambda: attention(heads_view(q), heads_view(k), heads_view(v))), [q, k, v]
    if op == "cross_entropy":
        h = make(batch, seq, s["hidden"], dt=param_dtype)
        w = make(s["vocab"], s["hidden"], dt=param_dtype, std=0.02)
        labels = torch.randint(0, s["vocab"], (batch, seq), device=device, generator=g)

        def forward():
            # the engine autocasts whenever it computes in a 16-bit dtype
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                return linear_cross_entropy(h, w, labels)
        return forward, [h, w]
    raise ValueError(f"unknown operation {op!r}")
