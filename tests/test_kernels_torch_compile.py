"""`--compile` compiles each transformer block with `fullgraph=True`: an operation dynamo cannot trace
must not be chosen for it, whoever asks for it (a forced backend or `auto`).

This module is itself a backend ("untraceable"): its attention is the reference's behind
`torch.compiler.disable`, which is how Transformer Engine marks its DotProductAttention.forward.
"""

import pytest
import torch

from megatron_mellama import kernels
from megatron_mellama.config import parse_config
from megatron_mellama.kernels import choice, dispatch, reference
from megatron_mellama.model.llama import DecoderLayer, rotary_tables

# declared by omission: no COMPILE_SAFE here


@torch.compiler.disable
def attention(q, k, v):
    return reference.attention(q, k, v)


@pytest.fixture(autouse=True)
def _untraceable_backend():
    dispatch.register_backend("untraceable", __name__)
    with kernels.use_backends(kernels.selected()):
        yield
    dispatch.unregister_backend("untraceable")


def test_a_forced_backend_keeps_its_untraceable_attention_out_of_compiled_blocks():
    assert kernels.configure("untraceable", "cpu")["attention"] == "untraceable"
    assert kernels.configure("untraceable", "cpu", compiled=True)["attention"] == "torch"


def test_transformer_engine_and_apex_declare_nothing_traceable():
    # their modules import TE/apex, absent here: the declarations are read from the source
    import ast
    from pathlib import Path

    for name in ("te_ops", "apex_ops"):
        tree = ast.parse((Path(kernels.__file__).parent / f"{name}.py").read_text())
        values = [n.value for n in tree.body if isinstance(n, ast.Assign)
                  and any(getattr(t, "id", None) == "COMPILE_SAFE" for t in n.targets)]
        assert len(values) == 1 and ast.unparse(values[0]) == "frozenset()", name


@pytest.mark.parametrize("compiled", [False, True])
def test_auto_does_not_time_untraceable_candidates_for_compiled_blocks(compiled, monkeypatch):
    seen = {}

    def fake_measure(candidates, device, shapes, timeout_s):
        seen.update(candidates)
        return {op: "torch" for op in candidates}

    monkeypatch.setattr(choice, "measure_isolated", fake_measure)
    kernels.configure("auto", "cuda", compiled=compiled)  # only the candidates are looked at
    assert ("untraceable" in seen["attention"]) is not compiled


def _layer_and_inputs():
    m = parse_config(["--model", "tiny", "--seq-length", "16"]).model
    torch.manual_seed(0)
    layer = DecoderLayer(m)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.02)
    cos, sin = rotary_tables(m)
    return layer, torch.randn(2, 16, m.hidden_size), cos, sin


def _compiled_run(layer, x, cos, sin):
    torch._dynamo.reset()
    # as parallel/recompute.apply_compile compiles a layer; tracing is dynamo's, whatever the backend
    layer.compile(fullgraph=True, backend="aot_eager")
    try:
        out = layer(x, cos, sin)
        out.sum().backward()
        return out
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_a_compiled_layer_runs_with_the_table_configure_gives():
    layer, x, cos, sin = _layer_and_inputs()
    expected = layer(x, cos, sin)
    kernels.configure("untraceable", "cpu", compiled=True)
    torch.testing.assert_close(_compiled_run(layer, x, cos, sin), expected, rtol=1e-5, atol=1e-5)


def test_the_untraceable_attention_would_break_the_compiled_layer():
    # the fake is as untraceable as TE's attention: what the two tests above keep out really fails
    layer, x, cos, sin = _layer_and_inputs()
    with kernels.use_backends({"attention": "untraceable"}):
        with pytest.raises(torch._dynamo.exc.Unsupported):
            _compiled_run(layer, x, cos, sin)
