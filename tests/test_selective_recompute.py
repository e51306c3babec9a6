"""Selective recompute and the attention kernels its policy cannot see (flex attention compiled on its
own, Transformer Engine's fused attention): kept from the forward, never run again in backward, and
flex attention never left to run uncompiled (every score materialised) inside the recompute region.

Flex attention has no backward on the CPU, and inductor's CPU flex kernels none either: the tests
let flex attention's checks pass on the CPU and compile it with a recording backend that runs its
graph as traced, which is enough to see where and how often it runs."""

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module
from torch.nn.attention.flex_attention import flex_attention
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from megatron_mellama.config import parse_config
from megatron_mellama.data.loader import document_ids_of
from megatron_mellama.kernels import dispatch, documents
from megatron_mellama.model import build_model
from megatron_mellama.parallel import recompute
from megatron_mellama.parallel.recompute import apply_activation_checkpointing
from test_kernels_adapters import _FakeDotProductAttention, te  # noqa: F401 (te: the fixture)

SEQ = 256
LENGTHS = (100, 156)  # two packed documents


def _config():
    return parse_config(["--model", "tiny", "--vocab-size", "128", "--seq-length", str(SEQ),
                         "--max-position-embeddings", str(SEQ)]).model


def _packed_batch():
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    tokens = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(0))
    return dict(tokens=tokens, labels=torch.roll(tokens, -1, 1), position_ids=positions,
                document_ids=document_ids_of(positions))


class _Flex:
    """Flex attention on the CPU, compiled with a backend that records each compilation, counting
    its calls."""

    def __init__(self):
        self.compilations, self.calls = 0, 0
        self.compiled = torch.compile(flex_attention, backend=self._backend)

    def _backend(self, graph, example_inputs):
        self.compilations += 1
        return graph.forward

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.compiled(*args, **kwargs)


@pytest.fixture
def flex(monkeypatch):
    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)
    monkeypatch.setattr(documents, "FLEX_DEVICE_TYPES", ("cpu",))
    standin = _Flex()
    monkeypatch.setattr(documents, "_compiled_flex_attention", lambda: standin)
    return standin


def _grads_and_calls(model, batch, calls, autocast=False):
    """Gradients, and how many attention calls `calls()` counts in the forward and in backward."""
    before = calls()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch)
    forward = calls() - before
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}, forward, calls() - before - forward


def _assert_same(grads, ref, **tolerance):
    assert list(grads) == list(ref)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], msg=name, **tolerance)


@pytest.mark.slow
def test_selective_recompute_keeps_flex_attention_from_the_forward(flex):
    cfg, batch = _config(), _packed_batch()
    ref, layers, again = _grads_and_calls(build_model(cfg, seed=1), batch, lambda: flex.calls)
    assert layers == cfg.num_layers and again == 0
    model = apply_activation_checkpointing(build_model(cfg, seed=1), "selective")
    grads, forward, backward = _grads_and_calls(model, batch, lambda: flex.calls)
    assert (forward, backward) == (cfg.num_layers, 0)
    _assert_same(grads, ref, rtol=1e-6, atol=1e-7)
    # full recompute runs it again, as it runs everything again
    model = apply_activation_checkpointing(build_model(cfg, seed=1), "full")
    assert _grads_and_calls(model, batch, lambda: flex.calls)[2] == cfg.num_layers


@pytest.fixture
def checkpoint_modes_not_ignored_by_dynamo(monkeypatch):
    """A torch whose selective-checkpoint dispatch modes lack `ignore_compile_internals`: dynamo
    runs any frame under them uncompiled."""
    from torch.utils import checkpoint as torch_checkpoint

    for name in ("_CachingTorchDispatchMode", "_CachedTorchDispatchMode"):
        monkeypatch.setattr(getattr(torch_checkpoint, name), "ignore_compile_internals",
                            classmethod(lambda cls: False))


def test_flex_attention_stays_compiled_where_dynamo_skips_frames_under_the_checkpoint_modes(
        flex, checkpoint_modes_not_ignored_by_dynamo):
    cfg, batch = _config(), _packed_batch()
    model = apply_activation_checkpointing(build_model(cfg, seed=1), "selective")
    _grads_and_calls(model, batch, lambda: flex.calls)
    assert flex.compilations >= 1, "flex attention ran uncompiled inside the recompute region"


def test_the_compile_probe_sees_dynamo_skipping_frames(checkpoint_modes_not_ignored_by_dynamo):
    assert recompute.compile_runs_outside_selective_mode.__wrapped__()
    # dynamo's older rule: skip while any entered mode does not ignore compile internals
    with torch._dynamo.config.patch(inline_torch_dispatch_torch_compile=False):
        assert not recompute.compile_runs_outside_selective_mode.__wrapped__()


def test_where_flex_attention_cannot_compile_packed_documents_take_the_tiled_path(flex, monkeypatch):
    cfg, batch = _config(), _packed_batch()
    ref, _, _ = _grads_and_calls(build_model(cfg, seed=1), batch, lambda: flex.calls)
    monkeypatch.setattr(recompute, "compile_runs_outside_selective_mode", lambda: False)
    model = apply_activation_checkpointing(build_model(cfg, seed=1), "selective")
    grads, forward, backward = _grads_and_calls(model, batch, lambda: flex.calls)
    assert (forward, backward) == (0, 0)
    _assert_same(grads, ref, rtol=1e-4, atol=1e-6)


@pytest.fixture
def te_attention(te):  # noqa: F811 (the imported fixture)
    dispatch.register_backend("te-standin", te.__name__)
    try:
        with dispatch.override({"attention": "te-standin"}):
            yield
    finally:
        dispatch.unregister_backend("te-standin")


def _te_calls():
    return sum(len(m.calls) for m in _FakeDotProductAttention.made)


def test_selective_recompute_keeps_transformer_engine_attention_from_the_forward(te_attention):
    cfg = _config()
    batch = {k: v for k, v in _packed_batch().items() if k in ("tokens", "labels")}
    ref, layers, again = _grads_and_calls(build_model(cfg, seed=1), batch, _te_calls, autocast=True)
    assert layers == cfg.num_layers and again == 0
    model = apply_activation_checkpointing(build_model(cfg, seed=1), "selective")
    grads, forward, backward = _grads_and_calls(model, batch, _te_calls, autocast=True)
    assert (forward, backward) == (cfg.num_layers, 0)
    _assert_same(grads, ref, rtol=1e-6, atol=1e-7)


class _HigherOrderOps(TorchDispatchMode):
    supports_higher_order_operators = True

    @classmethod
    def ignore_compile_internals(cls):
        return True  # eager flex attention compiles its own wrapper

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if isinstance(func, torch._ops.HigherOrderOperator):
            self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def test_the_policy_saves_flex_attention_s_higher_order_op(flex):
    """Flex attention as the policy sees it in a compiled layer's graph (or run eagerly): one op,
    whose output is kept."""
    assert torch.ops.higher_order.flex_attention in recompute._saved_ops()
    q = torch.randn(1, 2, 128, 8, requires_grad=True)
    out = checkpoint(lambda q: flex_attention(q, q, q).sin(), q, use_reentrant=False,
                     context_fn=recompute._selective_context)
    with _HigherOrderOps() as ops:
        out.sum().backward()
    assert "flex_attention" not in ops.names and "flex_attention_backward" in ops.names


def test_selective_recompute_keeps_context_parallel_flex_attention_from_the_forward(flex, monkeypatch):
    """Packed documents under context parallelism take flex attention over the gathered keys on a
    GPU: kept from the forward as well, the all-gather with it. One process plays a CP rank whose
    all-gather hands its own keys back (CP 1: the rank holds the whole sequence)."""
    import functools

    from megatron_mellama.parallel.context import ContextParallelAttention, chunk_document_mask

    monkeypatch.setattr(ContextParallelAttention, "_gather_in_order", lambda self, t, seq_len: t)

    def context_parallel(model):
        for layer in model.layers.values():
            layer.self_attn.attend = ContextParallelAttention(None, 1, 0, SEQ)
        model.document_mask = functools.partial(chunk_document_mask, cp=1, rank=0)
        return model

    cfg, batch = _config(), _packed_batch()
    ref, layers, again = _grads_and_calls(context_parallel(build_model(cfg, seed=1)), batch, lambda: flex.calls)
    assert layers == cfg.num_layers and again == 0
    model = apply_activation_checkpointing(context_parallel(build_model(cfg, seed=1)), "selective")
    grads, forward, backward = _grads_and_calls(model, batch, lambda: flex.calls)
    assert (forward, backward) == (cfg.num_layers, 0)
    _assert_same(grads, ref, rtol=1e-6, atol=1e-7)
