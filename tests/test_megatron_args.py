"""Megatron-LM's saved args <-> our ModelConfig: what is read, what is refused, and the round trip."""

from __future__ import annotations

import argparse

import pytest
import torch

from megatron_mellama.checkpoint.megatron.args import args_from_model_config, model_config_from_args, true_vocab_size
from megatron_mellama.checkpoint.sources import ConvertError
from megatron_mellama.config import ModelConfig

LLAMA2_13B = dict(num_layers=40, hidden_size=5120, num_attention_heads=40, ffn_hidden_size=13824,
                  max_position_embeddings=4096, norm_epsilon=1e-5, vocab_size=32000)


def megatron_args(**overrides) -> argparse.Namespace:
    args = argparse.Namespace(
        num_layers=40, hidden_size=5120, num_attention_heads=40, ffn_hidden_size=13824, group_query_attention=False,
        num_query_groups=1, kv_channels=128, max_position_embeddings=4096, position_embedding_type="rope",
        rotary_base=10000, normalization="RMSNorm", layernorm_epsilon=1e-5, swiglu=True,
        untie_embeddings_and_output_weights=True, add_bias_linear=False, padded_vocab_size=32256,
        make_vocab_size_divisible_by=128, tensor_model_parallel_size=4)
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def test_llama2_13b_args_give_its_config():
    cfg = model_config_from_args(megatron_args(), "common.pt")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.ffn_size) == (
        40, 5120, 40, 40, 13824)
    assert cfg.vocab_size == 32256 and cfg.norm_epsilon == 1e-5 and cfg.rotary_base == 10000.0
    # group_query_attention off: num_query_groups (1 in Megatron's defaults) is not read
    assert not cfg.group_query_attention


def test_gqa_epsilon_names_and_rope_scalings_are_read():
    cfg = model_config_from_args(megatron_args(group_query_attention=True, num_query_groups=8, norm_epsilon=1e-6,
                                               layernorm_epsilon=None, rotary_base=500000, use_rope_scaling=True,
                                               rope_scaling_factor=32.0), "x")
    assert cfg.kv_heads == 8 and cfg.norm_epsilon == 1e-6 and cfg.rotary_base == 500000.0
    assert cfg.use_rope_scaling and cfg.rope_scaling_factor == 32.0
    assert (cfg.rope_scaling_low_freq_factor, cfg.rope_scaling_high_freq_factor,
            cfg.rope_scaling_original_max_position_embeddings) == (1.0, 4.0, 8192)
    yarn = model_config_from_args(megatron_args(position_embedding_type="yarn", rotary_scaling_factor=8.0,
                                                yarn_original_max_position_embeddings=4096, mscale=0.7,
                                                mscale_all_dim=0.7), "x")
    assert yarn.position_embedding_type == "yarn" and yarn.yarn_rotary_scaling_factor == 8.0
    assert (yarn.yarn_original_max_position_embeddings, yarn.yarn_mscale, yarn.yarn_beta_fast) == (4096, 0.7, 32.0)
    linear = model_config_from_args(megatron_args(rotary_seq_len_interpolation_factor=4), "x")
    assert linear.rotary_seq_len_interpolation_factor == 4.0


@pytest.mark.parametrize("overrides,says", [
    (dict(layernorm_epsilon=1e-5, norm_epsilon=1e-6), "disagree"),
    (dict(kv_channels=64), "args.kv_channels is 64"),
    (dict(rotary_percent=0.5), "args.rotary_percent is 0.5"),
    (dict(rotary_interleaved=True), "args.rotary_interleaved is True"),
    (dict(qk_layernorm=True), "args.qk_layernorm is True"),
    (dict(multi_latent_attention=True), "multi-latent"),
    (dict(apply_layernorm_1p=True), "weight - 1"),
    (dict(num_layers=None), "args.num_layers is None"),
    (dict(num_attention_heads=48), "the heads must divide hidden_size"),
])
def test_what_this_model_cannot_represent_is_refused_by_name(overrides, says):
    with pytest.raises(ConvertError, match=says):
        model_config_from_args(megatron_args(**overrides), "common.pt")


def test_args_that_are_not_a_namespace_are_refused():
    with pytest.raises(ConvertError, match="not Megatron-LM's argparse.Namespace"):
        model_config_from_args({"num_layers": 2}, "common.pt")


def test_the_tokenizer_must_pad_to_the_embedding():
    args = megatron_args()
    assert true_vocab_size(args, None, "x") == 32256
    assert true_vocab_size(args, 32000, "x") == 32000  # 32000 -> multiple of 128 x 4 = 32256
    with pytest.raises(ConvertError, match="not this model's tokenizer"):
        true_vocab_size(args, 31000, "x")


@pytest.mark.parametrize("rope", [{}, dict(use_rope_scaling=True, rope_scaling_factor=8.0,
                                           rope_scaling_original_max_position_embeddings=8192),
                                  dict(position_embedding_type="yarn", yarn_rotary_scaling_factor=4.0,
                                       yarn_original_max_position_embeddings=4096, yarn_mscale=0.5)])
def test_export_args_read_back_as_the_same_config(rope):
    cfg = ModelConfig(**dict(LLAMA2_13B, group_query_attention=True, num_query_groups=8, rotary_base=1e6), **rope)
    args = args_from_model_config(cfg, tp=4, pp=2, divisible_by=128, ckpt_format="torch_dist",
                                  transformer_impl="transformer_engine", dtype=torch.bfloat16)
    assert args.padded_vocab_size == 32256 and args.layernorm_epsilon == args.norm_epsilon == 1e-5
    back = model_config_from_args(args, "x")
    for field in ("num_layers", "hidden_size", "num_attention_heads", "kv_heads", "ffn_size", "rotary_base",
                  "norm_epsilon", "use_rope_scaling", "rope_scaling_factor", "position_embedding_type",
                  "yarn_rotary_scaling_factor", "yarn_mscale", "max_position_embeddings"):
        assert getattr(back, field) == getattr(cfg, field), field
