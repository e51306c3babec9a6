"""`auto` times what the run computes: the inputs `workload()` builds from `run_shapes()` have the
shapes, dtypes and layouts of the arguments the model really hands each backend, under autocast,
with tensor and sequence parallelism.

This module is itself a backend ("recording"): each operation notes what it was given and runs the
reference. The model and the workload both run with it, and the notes are compared.
"""

import pytest
import torch
from engine_harness import TINY, spawn_gloo

from megatron_mellama.config import parse_config
from megatron_mellama.kernels import dispatch, reference
from megatron_mellama.kernels.workload import run_shapes, workload
from megatron_mellama.model.llama import Llama, rotary_tables

CALLS: list[tuple] = []


def _note(op, *args):
    CALLS.append((op, tuple((tuple(a.shape), a.dtype, a.is_contiguous()) if isinstance(a, torch.Tensor) else a
                            for a in args)))


def rms_norm(x, weight, eps):
    _note("rms_norm", x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def apply_rotary_qk(q, k, cos, sin):
    _note("rotary", q, k, cos, sin)
    return reference.apply_rotary_qk(q, k, cos, sin)


def swiglu(gate, up):
    _note("swiglu", gate, up)
    return reference.swiglu(gate, up)


def attention(q, k, v):
    _note("attention", q, k, v)
    return reference.attention(q, k, v)


def logsumexp_rows(logits):
    _note("logsumexp_rows", logits)
    return reference.logsumexp_rows(logits)


def cross_entropy_grad(logits, lse, labels, scale):
    _note("cross_entropy_grad", logits, lse, labels, scale)
    return reference.cross_entropy_grad(logits, lse, labels, scale)


def _recorded(run) -> set:
    dispatch.register_backend("recording", __name__)
    CALLS.clear()
    try:
        with dispatch.override({op: "recording" for op in dispatch.OPERATIONS}):
            run()
    finally:
        dispatch.unregister_backend("recording")
    return set(CALLS)


def _model_calls(cfg, tp_mesh=None, param_dtype=None) -> set:
    """What the model hands the backends in one forward of one micro-batch, as the engine runs it."""
    from megatron_mellama.parallel.tensor import apply_tensor_parallel

    m = cfg.model
    with torch.device("meta"):
        model = Llama(m)
    if tp_mesh is not None:
        apply_tensor_parallel(model, tp_mesh, cfg.parallel.sequence_parallel)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            getattr(p, "_local_tensor", p).normal_(0.0, 0.02)
        cos, sin = rotary_tables(m)
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)
        if param_dtype is not None:  # the parameters only, as FSDP's mixed precision casts them
            for p in model.parameters():
                p.data = p.data.to(param_dtype)
    g = torch.Generator().manual_seed(0)
    shape = (cfg.train.micro_batch_size, cfg.seq_length)
    tokens = torch.randint(0, m.vocab_size, shape, generator=g)
    labels = torch.randint(0, m.vocab_size, shape, generator=g)
    autocast = cfg.train.bf16 or cfg.train.fp16

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16 if cfg.train.bf16 else torch.float16, enabled=autocast):
            model(tokens, labels)
    return _recorded(run)


def _workload_calls(shapes) -> set:
    calls = set()
    for op in dispatch.OPERATIONS:
        forward, _ = workload(op, "cpu", shapes)
        calls |= _recorded(forward)
    return calls


def _by_op(calls):
    out = {}
    for op, args in calls:
        out.setdefault(op, set()).add(args)
    return out


@pytest.mark.parametrize("flags,param_dtype", [(["--bf16"], None), (["--fp16"], None), ([], None),
                                               (["--bf16"], torch.bfloat16)],
                         ids=["bf16-autocast", "fp16-autocast", "fp32", "bf16-parameters"])
def test_workload_hands_each_backend_what_the_model_does(flags, param_dtype):
    cfg = parse_config(TINY + flags)
    model = _by_op(_model_calls(cfg, param_dtype=param_dtype))
    timed = _by_op(_workload_calls(run_shapes(cfg, param_dtype=param_dtype)))
    assert set(model) == {"rms_norm", "rotary", "swiglu", "attention", "logsumexp_rows", "cross_entropy_grad"}
    for op in model:
        assert timed[op] == model[op], op


def test_the_norm_times_the_fp32_residual_stream_under_bf16_autocast():
    shapes = run_shapes(parse_config(TINY + ["--bf16"]))
    assert shapes["dtype"] == torch.bfloat16 and shapes["param_dtype"] == torch.float32
    _, (x, w) = workload("rms_norm", "cpu", shapes)
    assert x.dtype == w.dtype == torch.float32


def test_run_shapes_split_over_tensor_and_sequence_parallelism():
    cfg = parse_config(TINY + ["--tensor-model-parallel-size", "2", "--sequence-parallel"], world_size=2)
    s = run_shapes(cfg, 2)
    assert (s["seq"], s["norm_seq"], s["heads"], s["kv_heads"], s["vocab"]) == (16, 8, 2, 1, 64)
    assert run_shapes(cfg, 2, sequence_parallel=False)["norm_seq"] == 16
    assert run_shapes(cfg, 1)["norm_seq"] == 16  # sequence parallelism means nothing at TP 1


def test_context_parallel_ranks_time_their_share_of_the_sequence(monkeypatch):
    # a context-parallel rank computes on seq / CP tokens: attention and rotary are timed there
    from megatron_mellama.kernels import choice

    argv = TINY + ["--bf16", "--context-parallel-size", "2", "--tensor-model-parallel-size", "2",
                   "--sequence-parallel"]
    cfg = parse_config(argv, world_size=4)
    shapes = run_shapes(cfg, 2)
    assert (shapes["seq"], shapes["norm_seq"]) == (8, 4)
    built = {}

    def capture(candidates, device, timing_shapes, timeout_s):
        for op in ("attention", "rotary"):
            _, leaves = workload(op, "cpu", timing_shapes)
            built[op] = tuple(leaves[0].shape)
        return {op: "torch" for op in candidates}

    monkeypatch.setattr(choice, "measure_isolated", capture)
    with dispatch.override({}):
        choice.configure("auto", "cuda", timing_shapes=shapes)
    # (batch, seq, heads, head_dim) per rank: half the 16-token sequence, half the 4 heads
    assert built == {"attention": (2, 8, 2, 16), "rotary": (2, 8, 2, 16)}
    assert run_shapes(cfg, 2, cp=1)["seq"] == 16


def _tensor_parallel_rank(rank, world, argv):
    from torch.distributed.device_mesh import init_device_mesh

    cfg = parse_config(argv, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    calls = _model_calls(cfg, tp_mesh=mesh)
    # the forward's result is dropped, and with it the waits of tensor parallelism's asynchronous
    # collectives: a barrier on their group lets them finish before the process group is torn
    # down (an exit with gloo work in flight aborts the rank: "terminate called without an active
    # exception")
    torch.distributed.barrier(group=mesh.get_group())
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [True, False], ids=["sequence-parallel", "tensor-parallel"])
def test_workload_matches_a_tensor_parallel_rank(sequence_parallel, tmp_path):
    argv = TINY + ["--bf16", "--tensor-model-parallel-size", "2"]
    argv += ["--sequence-parallel"] if sequence_parallel else []
    ranks = spawn_gloo(_tensor_parallel_rank, 2, (argv,), str(tmp_path))
    assert ranks[0] == ranks[1]
    timed = _by_op(_workload_calls(run_shapes(parse_config(argv, world_size=2), 2)))
    model = _by_op(ranks[0])
    assert set(model) == set(timed)
    for op in model:
        assert timed[op] == model[op], op
