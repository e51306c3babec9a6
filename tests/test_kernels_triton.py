"""The `triton` backend against the `torch` reference: forward values, gradients and dtypes, on odd
shapes. On the CPU through Triton's interpreter (conftest sets TRITON_INTERPRET=1); on a GPU, with
TRITON_INTERPRET=0 (`benchmarks/gpu_check.sh`), the compiled kernels run on it."""

import os

import pytest

pytest.importorskip("triton")

import torch

from megatron_mellama.kernels import reference, triton_ops

# fp32 kernels and reference differ only in summation order. For bf16 the reference is run in fp32
# on the same bf16 inputs: the kernel computes in fp32 and rounds once when storing, so it sits
# within a couple of bf16 ulps (2^-8 relative each) of the exact value, while the reference's own
# bf16 arithmetic would add its intermediate roundings to the comparison. Triton's interpreter
# truncates fp32 -> bf16 instead of rounding to nearest, one more ulp at most; fp16 has 3 more bits.
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
       torch.float16: {"rtol": 2e-3, "atol": 2e-3}}


def _close(actual, expected, dtype):
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


DEVICE = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")


def _gen(seed):
    # inputs drawn on the CPU, so the CPU and GPU runs test the same values
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(DEVICE, dtype)


# ---------------------------------------------------------------- RMSNorm

@pytest.mark.slow
@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("hidden", [24, 40, 100])
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_rms_norm(rows, hidden, x_dtype, w_dtype):
    x = _randn(rows, hidden, dtype=x_dtype, seed=1, scale=3.0).requires_grad_()
    w = (1.0 + _randn(hidden, seed=2, scale=0.1)).to(w_dtype).requires_grad_()
    out = triton_ops.rms_norm(x, w, 1e-5)
    assert out.dtype == torch.promote_types(w_dtype, x_dtype) and out.shape == x.shape

    x32 = x.detach().float().requires_grad_()
    w32 = w.detach().float().requires_grad_()
    expected = reference.rms_norm(x32, w32, 1e-5)
    _close(out, expected, x_dtype)  # h is rounded to x_dtype whatever the output dtype

    dy = _randn(rows, hidden, seed=3).to(out.dtype)
    dx, dw = torch.autograd.grad(out, (x, w), dy)
    dx_ref, dw_ref = torch.autograd.grad(expected, (x32, w32), dy.float())
    assert dx.dtype == x_dtype and dw.dtype == w_dtype
    _close(dx, dx_ref, x_dtype)
    # the weight gradient sums over rows the product with h, rounded to x_dtype: the tolerance of
    # x_dtype, scaled with the number of rows
    torch.testing.assert_close(dw.float(), dw_ref, rtol=TOL[x_dtype]["rtol"], atol=TOL[x_dtype]["atol"] * rows)


def test_rms_norm_matches_reference_exactly_in_fp32_and_takes_any_layout():
    base = _randn(2, 40, 3, seed=4)
    x = base.transpose(1, 2).requires_grad_()  # (2, 3, 40), non-contiguous
    w = _randn(40, seed=5).requires_grad_()
    out = triton_ops.rms_norm(x, w, 1e-6)
    expected = reference.rms_norm(x, w, 1e-6)
    _close(out, expected, torch.float32)
    dy = _randn(2, 3, 40, seed=6)
    for got, want in zip(torch.autograd.grad(out, (x, w), dy), torch.autograd.grad(expected, (x, w), dy)):
        _close(got, want, torch.float32)


# ---------------------------------------------------------------- rotary embeddings

def _qk(batch, heads, kv_heads, seq, head_dim, dtype, transposed):
    def make(h, seed):
        if transposed:  # as the model makes them: .view(b, s, h, d).transpose(1, 2)
            return _randn(batch, seq, h, head_dim, dtype=dtype, seed=seed).transpose(1, 2)
        return _randn(batch, h, seq, head_dim, dtype=dtype, seed=seed)
    return make(heads, 10).requires_grad_(), make(kv_heads, 11).requires_grad_()


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [8, 16, 24])
@pytest.mark.parametrize("seq", [5, 13])
@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_apply_rotary_qk(head_dim, seq, kv_heads, dtype, transposed):
    q, k = _qk(2, 4, kv_heads, seq, head_dim, dtype, transposed)
    assert q.is_contiguous() != transposed
    # tables with more rows than seq; random rather than cos/sin of angles so that mixing up the two
    # halves of a table (equal in LLaMA's tables) would show
    cos = _randn(seq + 3, head_dim, seed=12)
    sin = _randn(seq + 3, head_dim, seed=13)
    q_out, k_out = triton_ops.apply_rotary_qk(q, k, cos, sin)
    assert q_out.dtype == dtype and k_out.dtype == dtype
    assert q_out.shape == q.shape and k_out.shape == k.shape

    q32, k32 = (t.detach().float().requires_grad_() for t in (q, k))
    q_ref, k_ref = reference.apply_rotary_qk(q32, k32, cos, sin)
    _close(q_out, q_ref, dtype)
    _close(k_out, k_ref, dtype)

    dq_out = _randn(*q.shape, seed=14).to(dtype)
    dk_out = _randn(*k.shape, seed=15).to(dtype)
    if transposed:  # gradients arriving in the same layout
        dq_out = dq_out.transpose(1, 2).contiguous().transpose(1, 2)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (dq_out, dk_out))
    dq_ref, dk_ref = torch.autograd.grad((q_ref, k_ref), (q32, k32), (dq_out.float(), dk_out.float()))
    assert dq.dtype == dtype and dk.dtype == dtype
    _close(dq, dq_ref, dtype)
    _close(dk, dk_ref, dtype)


def test_apply_rotary_qk_gradient_of_q_alone():
    q, k = _qk(1, 2, 1, 5, 8, torch.float32, True)
    cos, sin = _randn(5, 8, seed=16), _randn(5, 8, seed=17)
    (dq,) = torch.autograd.grad(triton_ops.apply_rotary_qk(q, k, cos, sin)[0].sum(), (q,))
    (dq_ref,) = torch.autograd.grad(reference.apply_rotary_qk(q, k, cos, sin)[0].sum(), (q,))
    _close(dq, dq_ref, torch.float32)


def test_apply_rotary_qk_reads_bf16_tables_and_keeps_them_as_given():
    q, k = _qk(2, 4, 2, 9, 16, torch.bfloat16, True)
    cos = _randn(12, 16, seed=18).bfloat16()
    sin = _randn(12, 16, seed=19).bfloat16()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q_out, k_out = triton_ops.apply_rotary_qk(q, k, cos, sin)
    # no fp32 copy of the tables made and kept for backward: the tables themselves
    assert [t.data_ptr() for t in saved] == [cos.data_ptr(), sin.data_ptr()]
    q32, k32 = (t.detach().float().requires_grad_() for t in (q, k))
    q_ref, k_ref = reference.apply_rotary_qk(q32, k32, cos.float(), sin.float())
    _close(q_out, q_ref, torch.bfloat16)
    _close(k_out, k_ref, torch.bfloat16)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (torch.ones_like(q_out), torch.ones_like(k_out)))
    dq_ref, dk_ref = torch.autograd.grad((q_ref, k_ref), (q32, k32), (torch.ones_like(q_ref), torch.ones_like(k_ref)))
    _close(dq, dq_ref, torch.bfloat16)
    _close(dk, dk_ref, torch.bfloat16)


@pytest.mark.slow
def test_every_layer_keeps_the_same_tables_for_backward_under_fsdp2s_input_casts():
    # FSDP2 casts each layer's floating-point inputs to its compute dtype (bf16): fp32 tables
    # handed to every layer became a bf16 copy per layer, which the kernel upcast to an fp32 copy
    # and kept for backward, 2 x positions x head_dim x 4 bytes per layer and micro-batch
    from megatron_mellama import kernels
    from megatron_mellama.config import parse_config
    from megatron_mellama.model import Llama, materialise

    cfg = parse_config(["--model", "tiny", "--vocab-size", "64", "--seq-length", "16"])
    model = materialise(Llama(cfg.model), cfg.model, "cpu", seed=0)
    model.to(DEVICE)
    for p in model.parameters():  # the parameters as FSDP2's param_dtype gives them; the tables stay fp32
        p.data = p.data.to(torch.bfloat16)

    def cast_inputs(module, args):  # FSDP2's MixedPrecisionPolicy(cast_forward_inputs=True)
        return tuple(a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args)

    for layer in model.layers.values():
        layer.register_forward_pre_hook(cast_inputs)
    table_shape = tuple(model.rope_cos.shape)
    tables = []

    def pack(t):
        if tuple(t.shape) == table_shape:
            tables.append(t)
        return t

    tokens = torch.randint(0, 64, (2, 16), generator=_gen(3)).to(DEVICE)
    with kernels.use_backends({"rotary": "triton"}), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, tokens)
    loss.backward()
    assert len(tables) == 2 * cfg.model.num_layers  # cos and sin, kept by every layer's rotary
    assert len({t.untyped_storage().data_ptr() for t in tables}) == 2  # one pair, the same for all


# ---------------------------------------------------------------- SwiGLU

@pytest.mark.parametrize("shape", [(1, 24), (7, 40), (3, 5, 100), (2, 13, 67)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu(shape, dtype):
    gate = _randn(*shape, dtype=dtype, seed=20, scale=3.0).requires_grad_()
    up = _randn(*shape, dtype=dtype, seed=21).requires_grad_()
    out = triton_ops.swiglu(gate, up)
    assert out.dtype == dtype and out.shape == gate.shape

    g32, u32 = (t.detach().float().requires_grad_() for t in (gate, up))
    expected = reference.swiglu(g32, u32)
    _close(out, expected, dtype)
    dy = _randn(*shape, seed=22).to(dtype)
    dg, du = torch.autograd.grad(out, (gate, up), dy)
    dg_ref, du_ref = torch.autograd.grad(expected, (g32, u32), dy.float())
    assert dg.dtype == dtype and du.dtype == dtype
    _close(dg, dg_ref, dtype)
    _close(du, du_ref, dtype)


def test_swiglu_non_contiguous():
    gate = _randn(40, 7, seed=23).t().requires_grad_()
    up = _randn(7, 40, seed=24).requires_grad_()
    out = triton_ops.swiglu(gate, up)
    expected = reference.swiglu(gate, up)
    _close(out, expected, torch.float32)
    for got, want in zip(torch.autograd.grad(out.sum(), (gate, up)), torch.autograd.grad(expected.sum(), (gate, up))):
        _close(got, want, torch.float32)


# ---------------------------------------------------------------- cross-entropy pieces

def _labels(rows, vocab, seed):
    labels = torch.randint(0, vocab, (rows,), generator=_gen(seed))
    # ignored rows and labels on another vocabulary shard, on either side of this one
    labels[::3] = -100
    labels[1::5] = vocab
    labels[2::7] = vocab + 17
    labels[4::6] = -1
    return labels.to(DEVICE)


@pytest.mark.slow
@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("vocab", [1, 37, 1000, 5003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_pieces(rows, vocab, dtype):
    logits = _randn(rows, vocab, dtype=dtype, seed=30, scale=4.0)
    labels = _labels(rows, vocab, seed=31)
    scale = (torch.rand(rows, generator=_gen(32)) / rows).to(DEVICE)

    lse = triton_ops.logsumexp_rows(logits)
    assert lse.dtype == torch.float32 and lse.shape == (rows,)
    # the sum of exponentials is accumulated in fp32 in both, whatever the logits' dtype
    torch.testing.assert_close(lse, reference.logsumexp_rows(logits), rtol=1e-5, atol=1e-5)

    expected = reference.cross_entropy_grad(logits.float(), lse, labels, scale)
    storage = logits.data_ptr()
    grad = triton_ops.cross_entropy_grad(logits, lse, labels, scale)
    assert grad.data_ptr() == storage and grad.dtype == dtype and grad.shape == (rows, vocab)
    # the gradient is a probability (minus one) times scale: tolerances relative to scale's size
    torch.testing.assert_close(grad.float(), expected, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] / rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_on_a_column_slice(dtype):
    # a vocabulary shard of a bigger tensor: row stride 1040 > 1000 columns
    full = _randn(7, 1040, dtype=dtype, seed=33, scale=4.0)
    before = full.clone()
    logits = full[:, 25:1025]
    assert logits.stride(0) > logits.shape[1]
    labels = _labels(7, 1000, seed=34)
    scale = torch.full((7,), 0.5, device=DEVICE)

    lse = triton_ops.logsumexp_rows(logits)
    torch.testing.assert_close(lse, reference.logsumexp_rows(logits), rtol=1e-5, atol=1e-5)
    expected = reference.cross_entropy_grad(logits.float(), lse, labels, scale)
    grad = triton_ops.cross_entropy_grad(logits, lse, labels, scale)
    assert grad.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(grad.float(), expected, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] / 7)
    # written in place, and only inside the slice
    torch.testing.assert_close(full[:, 25:1025], grad, rtol=0, atol=0)
    assert torch.equal(full[:, :25], before[:, :25]) and torch.equal(full[:, 1025:], before[:, 1025:])


def test_logsumexp_rows_is_stable_for_large_logits():
    logits = _randn(3, 5003, seed=35) + 1000.0
    lse = triton_ops.logsumexp_rows(logits)
    assert torch.isfinite(lse).all()
    torch.testing.assert_close(lse, reference.logsumexp_rows(logits), rtol=1e-6, atol=1e-4)
