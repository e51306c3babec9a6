"""The model equals transformers.LlamaForCausalLM for the same weights: logits and gradients."""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from megatron_mellama.model.hf_format import from_hf_name, hf_config_dict, model_config_from_hf, to_hf_name
from megatron_mellama.model import build_model

CONFIGS = [
    # name: (layers, hidden, heads, kv_heads, ffn, vocab, rope_base, eps)
    ("mha", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=96, vocab_size=101, rope_theta=10000.0, rms_norm_eps=1e-5)),
    ("gqa-8-2", dict(num_hidden_layers=3, hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
                     intermediate_size=200, vocab_size=256, rope_theta=500000.0, rms_norm_eps=1e-6)),
    ("mqa-4-1", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=1,
                     intermediate_size=64, vocab_size=77, rope_theta=10000.0, rms_norm_eps=1e-5)),
    ("gqa-6-3", dict(num_hidden_layers=4, hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                     intermediate_size=160, vocab_size=128, rope_theta=1000.0, rms_norm_eps=1e-5)),
]


def _pair(hf_kwargs, seed):
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(max_position_embeddings=64, tie_word_embeddings=False,
                                      attn_implementation="eager", initializer_range=0.1, **hf_kwargs)
    hf = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    # norms start at 1 in both; perturb them so a missing or misplaced norm weight would show
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours = build_model(model_config_from_hf(hf_cfg.to_dict()), seed=0)
    hf_state = hf.state_dict()
    ours.load_state_dict({from_hf_name(k): v for k, v in hf_state.items()}, strict=True)
    return hf, ours


@pytest.mark.parametrize("name,hf_kwargs", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_logits_and_gradients_match_transformers(name, hf_kwargs):
    hf, ours = _pair(hf_kwargs, seed=len(name))
    tokens = torch.randint(0, hf_kwargs["vocab_size"], (3, 37))

    hf_logits = hf(input_ids=tokens).logits
    our_logits = ours(tokens)
    assert our_logits.shape == hf_logits.shape
    assert (our_logits - hf_logits).abs().max().item() <= 1e-5

    labels = torch.roll(tokens, -1, dims=1)
    for model, logits in ((hf, hf_logits), (ours, our_logits)):
        F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).backward()
    hf_grads = {from_hf_name(k): p.grad for k, p in hf.named_parameters()}
    for k, p in ours.named_parameters():
        scale = hf_grads[k].abs().max().item()
        assert (p.grad - hf_grads[k]).abs().max().item() <= 1e-5 * max(1.0, scale), k


def test_names_cover_hf_state_dict_exactly():
    hf, ours = _pair(CONFIGS[1][1], seed=0)
    assert {to_hf_name(k) for k in ours.state_dict()} == set(hf.state_dict())
    assert all(to_hf_name(from_hf_name(k)) == k for k in hf.state_dict())


def test_hf_config_round_trip():
    hf_cfg = transformers.LlamaConfig(tie_word_embeddings=False, **CONFIGS[1][1])
    ours = model_config_from_hf(hf_cfg.to_dict())
    back = transformers.LlamaConfig(**hf_config_dict(ours))
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "rms_norm_eps", "max_position_embeddings"):
        assert getattr(back, key) == getattr(hf_cfg, key), key
    assert back.rope_parameters["rope_theta"] == hf_cfg.rope_parameters["rope_theta"]


def test_bf16_autocast_tracks_transformers():
    hf, ours = _pair(CONFIGS[1][1], seed=3)
    tokens = torch.randint(0, 256, (2, 16))
    reference = ours(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, hf_low = ours(tokens), hf(input_ids=tokens).logits
    assert low.dtype == torch.bfloat16

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    # bf16 keeps 8 bits of mantissa: a few parts in a thousand, accumulated over the layers
    assert rel(low, reference) < 2e-2
    assert rel(low, hf_low) < 2e-2
