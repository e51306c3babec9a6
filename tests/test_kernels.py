"""The kernel dispatch, the fused output layer + cross-entropy, and training with the Triton backend.

The Triton kernels themselves are compared with the reference op by op in test_kernels_triton.py.
"""

import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from engine_harness import TINY, reference, run_distributed, spawn_gloo

from megatron_mellama import kernels
from megatron_mellama.kernels import autotune, dispatch, linear_cross_entropy


@pytest.fixture(autouse=True)
def _restore_kernel_table():
    # the table is process-wide: what a test configures must not leak into the next test
    with kernels.use_backends(kernels.selected()):
        yield


def _case(tokens=14, hidden=16, vocab=37, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g).to(dtype)
    w = torch.randn(vocab, hidden, generator=g) * 0.5
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[3] = -100
    labels[-1] = -100
    return h, w, labels


def _naive(h, w, labels):
    """The unfused output layer: full logits, their fp32 copy, torch's cross-entropy."""
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = F.cross_entropy((h @ w.t()).float(), labels, ignore_index=-100, reduction="sum")
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _fused(h, w, labels, **kw):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = linear_cross_entropy(h, w, labels, **kw)
    (loss * 0.5).backward()  # a non-unit upstream gradient must scale every gradient
    return loss.detach(), h.grad * 2, w.grad * 2


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [1, 3, 5, 14, None])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_loss_equals_full_logits_loss(chunk, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    h, w, labels = _case()
    ref = _naive(h, w, labels)
    with kernels.use_backends(backend):
        out = _fused(h, w, labels, chunk_tokens=chunk)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_loss_with_tiny_chunks_of_tokens_and_of_vocabulary_rows(monkeypatch):
    from megatron_mellama.kernels import fused_loss

    # 40 elements: one token per logits chunk, two vocabulary rows per weight-gradient block
    monkeypatch.setattr(fused_loss, "CHUNK_ELEMENTS", 40)
    h, w, labels = _case()
    for a, b in zip(_fused(h, w, labels), _naive(h, w, labels)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_loss_keeps_batch_shape_and_ignores_everything_ignored():
    h, w, labels = _case(tokens=12)
    loss3d = linear_cross_entropy(h.view(2, 6, -1), w, labels.view(2, 6), chunk_tokens=4)
    torch.testing.assert_close(loss3d, _naive(h, w, labels)[0])
    all_ignored = torch.full_like(labels, -100)
    assert linear_cross_entropy(h, w, all_ignored).item() == 0.0


def test_fused_loss_under_bf16_autocast_matches_the_autocast_naive_loss():
    h, w, labels = _case(tokens=20, hidden=32, vocab=50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive = F.cross_entropy((h @ w.t()).float(), labels, reduction="sum")
        fused = linear_cross_entropy(h, w, labels, chunk_tokens=7)
    # both use bf16 logits: they agree to bf16's rounding of the logits, not bit for bit
    torch.testing.assert_close(fused, naive, rtol=1e-2, atol=1e-2)
    assert fused.dtype == torch.float32


def test_per_row_loss_sums_without_atomics_and_repeats_bit_for_bit(monkeypatch):
    # index_add_ accumulates with atomics on CUDA, in an order that changes from run to run; the
    # per-row sums must not go through it (nor through any op deterministic mode refuses)
    def no_index_add(*args, **kwargs):
        raise AssertionError("the per-row loss called index_add_")

    monkeypatch.setattr(torch.Tensor, "index_add_", no_index_add)
    monkeypatch.setattr(torch.Tensor, "index_add", no_index_add)
    monkeypatch.setattr(torch, "index_add", no_index_add)
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(4, 9, 16, generator=g), torch.randn(37, 16, generator=g)
    labels = torch.randint(0, 37, (4, 9), generator=g)
    labels[2, :5] = -100
    want = F.cross_entropy((hidden @ weight.T).transpose(1, 2), labels, reduction="none").sum(1)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.no_grad():
            runs = [linear_cross_entropy(hidden, weight, labels, chunk_tokens=5, per_row=True) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert all(torch.equal(r, runs[0]) for r in runs)
    torch.testing.assert_close(runs[0], want, rtol=1e-6, atol=1e-5)


def _vocab_parallel_rank(rank, world):
    """Both cases, with and without sequence parallelism, from one launch: {sequence_parallel: results}."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for sequence_parallel in (False, True):
        h, w, labels = _case(tokens=12, vocab=40)
        h = h.view(2, 6, -1)
        weight = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
        # with sequence parallelism the hidden states arrive sharded on the sequence
        hidden = (distribute_tensor(h, mesh, [Shard(1)]) if sequence_parallel else h).requires_grad_()
        loss = linear_cross_entropy(hidden, weight, labels.view(2, 6), chunk_tokens=5)
        loss.backward()
        h_grad = hidden.grad.full_tensor() if sequence_parallel else hidden.grad
        results[sequence_parallel] = dict(loss=loss.detach(), h_grad=h_grad, w_grad=weight.grad.full_tensor())
    return results


@pytest.fixture(scope="module")
def vocab_parallel_ranks(tmp_path_factory):
    return spawn_gloo(_vocab_parallel_rank, 2, (), str(tmp_path_factory.mktemp("vocab_parallel")))


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_vocab_parallel_fused_loss_equals_one_process(sequence_parallel, vocab_parallel_ranks):
    h, w, labels = _case(tokens=12, vocab=40)
    ref_loss, ref_h, ref_w = _naive(h, w, labels)
    for r in (ranks[sequence_parallel] for ranks in vocab_parallel_ranks):
        torch.testing.assert_close(r["loss"], ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["h_grad"].view(12, -1), ref_h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["w_grad"], ref_w, rtol=1e-5, atol=1e-5)


# ---- dispatch -----------------------------------------------------------------------------------

def test_auto_on_cpu_is_the_reference():
    assert set(kernels.configure("auto", "cpu").values()) == {"torch"}


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown kernel backend 'cudnn'"):
        kernels.configure("cudnn", "cpu")


def test_unavailable_backend_falls_back_and_is_reported_once(caplog):
    dispatch._reported.discard(("te", logging.WARNING))
    with caplog.at_level(logging.WARNING, logger="megatron_mellama.kernels.dispatch"):
        first = kernels.configure("te", "cpu")
        kernels.configure("te", "cpu")
    assert set(first.values()) == {"torch"}
    reports = [r for r in caplog.records if "'te'" in r.getMessage()]
    assert len(reports) == 1 and "not available" in reports[0].getMessage()


def test_triton_backend_covers_all_but_attention():
    pytest.importorskip("triton")
    table = kernels.configure("triton", "cpu")
    assert table == {"rms_norm": "triton", "rotary": "triton", "swiglu": "triton", "attention": "torch",
                     "cross_entropy": "triton"}


def test_compiled_blocks_leave_the_elementwise_operations_to_inductor():
    pytest.importorskip("triton")
    table = kernels.configure("triton", "cpu", compiled=True)
    assert table == {"rms_norm": "torch", "rotary": "torch", "swiglu": "torch", "attention": "torch",
                     "cross_entropy": "triton"}


def test_meta_tensors_take_the_reference():
    pytest.importorskip("triton")
    with kernels.use_backends("triton"):
        x = torch.empty(3, 8, device="meta")
        assert dispatch.implementation("rms_norm", x).__name__.endswith(".reference")
        assert kernels.rms_norm(x, torch.empty(8, device="meta"), 1e-5).shape == (3, 8)


@pytest.mark.slow
def test_triton_on_cpu_without_its_interpreter_is_reported_not_fatal():
    pytest.importorskip("triton")
    code = ("from megatron_mellama import kernels; t = kernels.configure('triton', 'cpu'); "
            "print(sorted(set(t.values())))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['torch']"
    assert "TRITON_INTERPRET=1" in out.stderr


def test_autotune_picks_the_fastest_and_skips_a_failing_backend(monkeypatch):
    timings = {"torch": 2.0, "triton": 1.0, "te": RuntimeError("no kernel for this shape")}

    def fake_time(op, backend, device, shapes, repeats=5):
        if isinstance(timings[backend], Exception):
            raise timings[backend]
        return timings[backend]

    monkeypatch.setattr(autotune, "time_backend", fake_time)
    monkeypatch.setattr(autotune, "disagreement", lambda *args: 0.0)
    candidates = {"rms_norm": ["torch", "triton", "te"], "swiglu": ["torch"]}
    result = autotune.measure(candidates, "cpu")
    assert result["table"] == {"rms_norm": "triton", "swiglu": "torch"}
    assert "no kernel for this shape" in result["failures"]["rms_norm"]["te"]
    assert "swiglu" not in result["seconds"]  # one candidate: nothing to time
    timings["torch"] = 0.5
    assert autotune.measure(candidates, "cpu")["table"]["rms_norm"] == "torch"


def test_autotune_times_every_operation_on_small_shapes():
    shapes = dict(batch=2, seq=4, norm_seq=4, hidden=16, heads=2, kv_heads=1, head_dim=8, ffn=24, vocab=30,
                  positions=8, eps=1e-5, dtype=torch.float32, param_dtype=torch.float32)
    for op in kernels.OPERATIONS:
        assert autotune.time_backend(op, "torch", torch.device("cpu"), shapes, repeats=1) > 0


# ---- training ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--recompute-granularity", "selective"]], ids=["plain", "selective-recompute"])
def test_training_with_triton_kernels_follows_the_torch_loss_curve(extra):
    pytest.importorskip("triton")
    steps, two_layers = 2, ["--num-layers", "2"]  # the interpreter runs the kernels slowly
    torch_run = reference(TINY + two_layers + extra + ["--kernel-backend", "torch"], steps)
    triton_run = reference(TINY + two_layers + extra + ["--kernel-backend", "triton"], steps)
    assert kernels.selected()["rms_norm"] == "triton"  # the run really used the Triton kernels
    torch.testing.assert_close(torch.tensor(triton_run["losses"]), torch.tensor(torch_run["losses"]),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(triton_run["grad_norms"]), torch.tensor(torch_run["grad_norms"]),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_tensor_parallel_training_with_triton_kernels_equals_one_process(tmp_path):
    pytest.importorskip("triton")
    steps = 2
    ref = reference(TINY + ["--kernel-backend", "torch"], steps)
    ranks = run_distributed(TINY + ["--kernel-backend", "triton", "--tensor-model-parallel-size", "2",
                                    "--sequence-parallel"], 2, steps, str(tmp_path))
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(r["eval_loss"]), torch.tensor(ref["eval_loss"]), rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.slow
def test_fp16_training_with_triton_kernels_stays_within_fp16_rounding_of_fp32():
    pytest.importorskip("triton")
    steps, two_layers = 2, ["--num-layers", "2"]  # the interpreter runs the kernels slowly
    fp32 = reference(TINY + two_layers + ["--kernel-backend", "torch"], steps)
    # a static loss scale: the dynamic one starts at 2^32 and skips steps until it has come down
    fp16 = reference(TINY + two_layers + ["--kernel-backend", "triton", "--fp16", "--loss-scale", "1024"], steps)
    assert fp16["skipped"] == [False] * steps
    torch.testing.assert_close(torch.tensor(fp16["losses"]), torch.tensor(fp32["losses"]), rtol=1e-3, atol=0)
    torch.testing.assert_close(torch.tensor(fp16["grad_norms"]), torch.tensor(fp32["grad_norms"]), rtol=1e-3, atol=0)


# ---- the fused loss under sequence parallelism: collectives -------------------------------------

_COLLECTIVES = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
                "reduce_scatter_tensor")


def _tp_sp_step_collectives(rank, world):
    import torch.distributed as dist

    from engine_harness import global_batches, micro_batches_of
    from megatron_mellama.config import parse_config
    from megatron_mellama.parallel.mesh import ParallelDims
    from megatron_mellama.training.engine import Engine

    cfg = parse_config(TINY + ["--tensor-model-parallel-size", "2", "--sequence-parallel"], world_size=world)
    engine = Engine(cfg, ParallelDims.from_config(cfg, world).build_mesh("cpu"))
    calls, originals = [], {n: getattr(dist, n) for n in _COLLECTIVES if hasattr(dist, n)}

    def counted(name, fn):
        def call(tensor, *args, **kwargs):
            calls.append((name, tensor.numel()))  # the output of a gather / reduce-scatter
            return fn(tensor, *args, **kwargs)
        return call

    for name, fn in originals.items():
        setattr(dist, name, counted(name, fn))
    try:
        result = engine.step(micro_batches_of(global_batches(cfg, 1)[0], cfg, 0, 1))
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return dict(calls=calls, loss=result.loss, grad_norm=result.grad_norm)


@pytest.mark.slow
def test_sequence_parallel_loss_reduce_scatters_the_hidden_gradient(tmp_path):
    """TP2 + SP: the output layer's hidden-state gradient is reduce-scattered to each rank's sequence
    slice (one per micro-batch, half the size of the states); no full-size all-reduce of it is left."""
    from megatron_mellama.config import parse_config

    cfg = parse_config(TINY)
    micro_batches = cfg.train.global_batch_size // cfg.train.micro_batch_size
    full = cfg.train.micro_batch_size * cfg.seq_length * cfg.model.hidden_size  # one micro-batch's states
    ref = reference(TINY, 1)
    for r in spawn_gloo(_tp_sp_step_collectives, 2, (), str(tmp_path)):
        calls = r["calls"]
        assert not [c for c in calls if c[0] == "all_reduce" and c[1] >= full // 2], calls
        scatters = [n for name, n in calls if name.startswith("reduce_scatter")]
        assert scatters == [full // 2] * micro_batches, calls
        gathers = [n for name, n in calls if name.startswith("all_gather")]
        assert gathers == [full] * micro_batches, calls
        torch.testing.assert_close(torch.tensor(r["loss"]), torch.tensor(ref["losses"][0]), rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.tensor(r["grad_norm"]), torch.tensor(ref["grad_norms"][0]), rtol=1e-5,
                                   atol=0)
