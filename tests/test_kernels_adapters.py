"""The apex and Transformer Engine adapters against stand-ins of the functions they call.

Neither package (nor a GPU) is here, so each test puts a small fake of the package into sys.modules,
imports the adapter fresh, and checks what the adapter hands the package and returns: dtypes under
autocast, layouts, caching. The fakes compute the same math in plain PyTorch and behave as the
packages document (apex casts its inputs to the autocast dtype; TE takes `bshd` tensors and angles).
The packages' own kernels are not run: `benchmarks/kernel_speed.py --check` does that on a GPU.
"""

import importlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import megatron_mellama.kernels as kernels_package
from megatron_mellama.kernels import reference


def _install(monkeypatch, modules: dict, adapter: str):
    """Put the fake `modules` into sys.modules and import `adapter` against them."""
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
        parent, _, child = name.rpartition(".")
        if parent in modules:
            setattr(modules[parent], child, module)
    full = f"megatron_mellama.kernels.{adapter}"
    # whatever import of the adapter exists, it is restored afterwards, and the fake one goes
    monkeypatch.delitem(sys.modules, full, raising=False)
    monkeypatch.setattr(kernels_package, adapter, None, raising=False)
    module = importlib.import_module(full)
    monkeypatch.setitem(sys.modules, full, module)
    return module


# ---------------------------------------------------------------- apex

@pytest.fixture
def apex(monkeypatch):
    received = []

    def fused_rms_norm_affine(input, weight, normalized_shape, eps=1e-6, memory_efficient=False):
        # apex: `_cast_if_autocast_enabled` casts every tensor argument to the autocast dtype (apex
        # asks about CUDA's autocast; the fake about the input's device, the CPU here)
        if torch.is_autocast_enabled(input.device.type):
            dtype = torch.get_autocast_dtype(input.device.type)
            input, weight = input.to(dtype), weight.to(dtype)
        received.append((input.dtype, weight.dtype))
        h = input.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return (weight.float() * h).to(input.dtype)  # apex returns the input's dtype

    modules = {"apex": types.ModuleType("apex"), "apex.normalization": types.ModuleType("apex.normalization"),
               "apex.normalization.fused_layer_norm": types.ModuleType("apex.normalization.fused_layer_norm")}
    modules["apex.normalization.fused_layer_norm"].fused_rms_norm_affine = fused_rms_norm_affine
    module = _install(monkeypatch, modules, "apex_ops")
    module.received = received
    return module


def test_apex_norm_takes_statistics_of_the_fp32_residual_under_bf16_autocast(apex):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 5, 48, generator=g) * 3).requires_grad_()
    w = (1 + 0.1 * torch.randn(48, generator=g)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = apex.rms_norm(x, w, 1e-5)
        expected = reference.rms_norm(x, w, 1e-5)
    assert apex.received == [(torch.float32, torch.float32)]
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(out.sum(), (x, w))
    assert [t.dtype for t in grads] == [torch.float32, torch.float32]


def test_apex_norm_of_bf16_activations_returns_the_promoted_dtype(apex):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 40, generator=g).bfloat16()
    w = 1 + 0.1 * torch.randn(40, generator=g)
    out = apex.rms_norm(x, w, 1e-5)
    assert apex.received == [(torch.bfloat16, torch.bfloat16)]  # one dtype, as apex wants
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference.rms_norm(x, w, 1e-5), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- Transformer Engine

class _FakeDotProductAttention(torch.nn.Module):
    made = []

    def __init__(self, num_attention_heads, kv_channels, num_gqa_groups=None, attention_dropout=0.0,
                 attn_mask_type="causal", qkv_format="sbhd"):
        super().__init__()
        assert (attention_dropout, attn_mask_type, qkv_format) == (0.0, "causal", "bshd")
        self.heads, self.kv_heads = num_attention_heads, num_gqa_groups
        self.calls = []
        self.made.append(self)

    def forward(self, q, k, v):
        self.calls.append(tuple((tuple(t.shape), t.dtype, t.is_contiguous()) for t in (q, k, v)))
        assert q.shape[2] == self.heads and k.shape[2] == self.kv_heads
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True,
                                             enable_gqa=self.kv_heads != self.heads)
        batch, _, seq, _ = out.shape
        return out.transpose(1, 2).reshape(batch, seq, -1)


def _fake_rope(t, freqs, tensor_format="sbhd", fused=False):
    # TE: freqs (s, 1, 1, d) fp32 angles, rotate-half; computed in fp32, returned in t's dtype
    assert freqs.dtype == torch.float32 and freqs.shape[1:3] == (1, 1) and tensor_format == "bshd"
    _fake_rope.calls += 1
    f = freqs.transpose(0, 1)  # (1, s, 1, d) against (b, s, h, d)
    x = t.float()
    return (x * f.cos() + reference.rotate_half(x) * f.sin()).to(t.dtype)


@pytest.fixture
def te(monkeypatch):
    _FakeDotProductAttention.made = []
    _fake_rope.calls = 0
    names = ["transformer_engine", "transformer_engine.pytorch", "transformer_engine.pytorch.attention",
             "transformer_engine.pytorch.attention.rope"]
    modules = {n: types.ModuleType(n) for n in names}
    modules["transformer_engine.pytorch"].DotProductAttention = _FakeDotProductAttention
    modules["transformer_engine.pytorch.attention.rope"].apply_rotary_pos_emb = _fake_rope
    return _install(monkeypatch, modules, "te_ops")


def _qkv(dtype, batch=2, seq=12, heads=4, kv_heads=2, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)

    def make(h):  # the model's layout: (batch, heads, seq, head_dim) views of (batch, seq, heads, head_dim)
        return torch.randn(batch, seq, h, head_dim, generator=g).to(dtype).transpose(1, 2)
    return make(heads), make(kv_heads), make(kv_heads)


def test_te_attention_gets_the_half_precision_inputs_of_autocast_in_bshd(te):
    q, k, v = _qkv(torch.bfloat16)
    out = te.attention(q, k, v)
    [module] = _FakeDotProductAttention.made
    assert module.calls == [(((2, 12, 4, 8), torch.bfloat16, True), ((2, 12, 2, 8), torch.bfloat16, True),
                             ((2, 12, 2, 8), torch.bfloat16, True))]
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference.attention(q, k, v), rtol=2e-2, atol=2e-2)


def test_te_attention_leaves_fp32_to_the_reference(te):
    # TE would run its unfused attention on fp32, materialising the (seq x seq) scores
    q, k, v = _qkv(torch.float32)
    torch.testing.assert_close(te.attention(q, k, v), reference.attention(q, k, v), rtol=0, atol=0)
    assert _FakeDotProductAttention.made == []


def test_te_attention_makes_one_module_per_head_layout(te):
    te.attention(*_qkv(torch.bfloat16))
    te.attention(*_qkv(torch.bfloat16, seed=1, batch=1, seq=5))  # other batch and sequence: same module
    te.attention(*_qkv(torch.bfloat16, kv_heads=4))
    te.attention(*_qkv(torch.bfloat16, head_dim=16))
    assert [(m.heads, m.kv_heads, len(m.calls)) for m in _FakeDotProductAttention.made] == [(4, 2, 2), (4, 4, 1),
                                                                                            (4, 2, 1)]


def test_te_rotary_matches_the_reference_and_derives_its_angles_once_per_table(te):
    m_cos, m_sin = _tables(rows=32, head_dim=8)
    q, k, _ = _qkv(torch.float32)
    for _ in range(2):
        got = te.apply_rotary_qk(q, k, m_cos, m_sin)
        for a, b in zip(got, reference.apply_rotary_qk(q, k, m_cos, m_sin)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    [(_, (first, scale))] = te._rotations.entries
    te.apply_rotary_qk(q, k, m_cos, m_sin)
    assert te._rotations.misses == 1 and first.shape == (32, 1, 1, 8) and scale is None
    with torch.no_grad():
        m_cos.copy_(_tables(rows=32, head_dim=8, base=500.0)[0])  # tables written in place: new angles
        m_sin.copy_(_tables(rows=32, head_dim=8, base=500.0)[1])
    got = te.apply_rotary_qk(q, k, m_cos, m_sin)
    assert te._rotations.misses == 2
    torch.testing.assert_close(got[0], reference.apply_rotary_qk(q, k, m_cos, m_sin)[0], rtol=1e-5, atol=1e-5)
    other = _tables(rows=32, head_dim=8)
    te.apply_rotary_qk(q, k, *other)
    assert te._rotations.misses == 3 and te._rotations.entries[0][0][0]() is other[0]


def _yarn_config(*flags):
    from megatron_mellama.config import parse_config

    return parse_config(["--model", "tiny", "--position-embedding-type", "yarn", "--yarn-rotary-scaling-factor",
                         "4", *flags])


@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16], ids=["fp32-tables", "bf16-tables"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_te_rotary_keeps_yarns_attention_factor(te, dtype, table_dtype):
    # YaRN's cos and sin carry its attention factor (1.14 at factor 4): TE rotates by the angle
    # alone, so the adapter must scale q and k by the tables' magnitude, or every attention logit
    # comes out 1.14^2 = 1.3 times too small
    from megatron_mellama.model import rope

    cfg = _yarn_config().model
    cos, sin = (t[:40].to(table_dtype) for t in rope.rotary_tables(cfg))
    q, k, _ = _qkv(dtype, seq=40, head_dim=cfg.head_dim)
    got = te.apply_rotary_qk(q, k, cos, sin)
    want = reference.apply_rotary_qk(q.float(), k.float(), cos.float(), sin.float())
    # bf16 tables: the reference multiplies by each rounded entry, TE's path by their one factor
    exact = dtype == table_dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-5) if exact else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, **tol)
    [(_, (_, scale))] = te._rotations.entries
    assert scale == pytest.approx(rope.yarn_attention_factor(4.0, cfg.yarn_mscale, cfg.yarn_mscale_all_dim),
                                  rel=1e-6 if table_dtype == torch.float32 else 4e-3)


def test_te_rotary_scales_by_each_entry_where_the_magnitude_varies(te):
    cos, sin = _tables(rows=12, head_dim=8)
    ramp = torch.linspace(0.5, 2.0, 12).unsqueeze(1)
    q, k, _ = _qkv(torch.float32)
    got = te.apply_rotary_qk(q, k, cos * ramp, sin * ramp)
    for a, b in zip(got, reference.apply_rotary_qk(q, k, cos * ramp, sin * ramp)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_te_rotary_derives_its_angles_once_for_every_layer_under_fsdp2s_input_casts(te, monkeypatch):
    # FSDP2 casts each layer's floating-point inputs to its compute dtype; fp32 tables would be a
    # new bf16 tensor in every layer and the angles derived again in each
    from megatron_mellama import kernels
    from megatron_mellama.config import parse_config
    from megatron_mellama.kernels import dispatch
    from megatron_mellama.model import Llama, materialise

    cfg = parse_config(["--model", "tiny", "--vocab-size", "64", "--seq-length", "16"])
    torch.manual_seed(0)
    model = materialise(Llama(cfg.model), cfg.model, "cpu", seed=0)
    for p in model.parameters():  # the parameters as FSDP2's param_dtype gives them; the tables stay fp32
        p.data = p.data.to(torch.bfloat16)
    for layer in model.layers.values():
        layer.register_forward_pre_hook(_cast_inputs_like_fsdp2(torch.bfloat16))
    dispatch.register_backend("te_stand_in", te.__name__)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    try:
        with kernels.use_backends({"rotary": "te_stand_in"}):
            for _ in range(2):  # two micro-batches
                model(tokens, tokens).backward()
    finally:
        dispatch.unregister_backend("te_stand_in")
    assert _fake_rope.calls == 2 * 2 * cfg.model.num_layers  # q and k, every layer, both micro-batches
    assert te._rotations.misses == 1


def _cast_inputs_like_fsdp2(dtype):
    """A forward pre-hook casting floating-point positional inputs to `dtype`, as FSDP2's
    MixedPrecisionPolicy(cast_forward_inputs=True) does (tensors already in `dtype` untouched)."""
    def hook(module, args):
        return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    return hook


def _tables(rows, head_dim, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(rows, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()
