"""Building on the meta device and explicit, layout-independent initialisation."""

import math

import torch

from megatron_mellama.config import parse_config
from megatron_mellama.model import build_model
from megatron_mellama.model.llama import Llama


def _tiny():
    return parse_config(["--model", "tiny", "--vocab-size", "512"]).model


def test_meta_build_allocates_nothing_and_names_layers_globally():
    with torch.device("meta"):
        model = Llama(parse_config(["--model", "llama2-13b"]).model)
    assert all(p.is_meta for p in model.parameters())
    names = [n for n, _ in model.named_parameters()]
    assert "layers.39.mlp.down_proj.weight" in names and names[0] == "embed_tokens.weight"


def test_initialisation_statistics():
    cfg = _tiny()
    model = build_model(cfg, seed=3)
    params = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values())
    assert torch.equal(params["layers.0.input_layernorm.weight"], torch.ones(cfg.hidden_size))
    assert torch.equal(params["norm.weight"], torch.ones(cfg.hidden_size))
    assert abs(params["embed_tokens.weight"].std().item() - 0.02) < 0.002
    scaled = 0.02 / math.sqrt(2 * cfg.num_layers)
    assert abs(params["layers.1.mlp.down_proj.weight"].std().item() - scaled) < 0.15 * scaled
    # rotary tables were filled, not left as uninitialised memory
    assert torch.equal(model.rope_cos[0], torch.ones(cfg.head_dim))


def test_initialisation_depends_only_on_seed_and_name():
    cfg = _tiny()
    a, b, c = build_model(cfg, seed=5), build_model(cfg, seed=5), build_model(cfg, seed=6)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name
    # two layers of identical shape still differ: each tensor has its own stream
    assert not torch.equal(a.layers["0"].self_attn.q_proj.weight, a.layers["1"].self_attn.q_proj.weight)


def test_causality_future_tokens_do_not_change_the_past():
    model = build_model(_tiny(), seed=0)
    tokens = torch.randint(0, 512, (1, 20))
    changed = tokens.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 512
    a, b = model(tokens), model(changed)
    assert torch.allclose(a[0, :12], b[0, :12], atol=1e-6)
    assert not torch.allclose(a[0, 12:], b[0, 12:])


def test_stage_without_embedding_and_head_passes_hidden_states():
    model = build_model(_tiny(), seed=0)
    tokens = torch.randint(0, 512, (2, 10))
    full = model(tokens)
    hidden = model.embed_tokens(tokens)
    model.embed_tokens, head, model.lm_head = None, model.lm_head, None
    assert model(hidden).shape == (2, 10, 64)
    assert torch.allclose(head(model(hidden)), full, atol=1e-6)
