"""A Megatron-LM checkpoint's saved `args` <-> our ModelConfig.

Import reads the architecture from the args alone (never from flags the user retypes). Megatron-LM's
args hold hundreds of fields; those that change what a LLaMA-shaped model computes are read or
checked here, and a value this model cannot represent (LayerNorm, biases, tied embeddings, learned
positions, experts, other activations, ...) is refused by name. Fields that only concern training
(optimizer, data, parallel layout, kernels, dropout) do not change the function and are not read.
"""

from __future__ import annotations

import argparse

import torch

from ...config import ModelConfig
from ..sources import ConvertError
from .layouts import padded_vocab

# Megatron-LM's llama3 scaling (`--use-rope-scaling`) fixes these (megatron-core's RotaryEmbedding)
_LLAMA3_FIXED = dict(rope_scaling_low_freq_factor=1.0, rope_scaling_high_freq_factor=4.0,
                     rope_scaling_original_max_position_embeddings=8192)
# (field, the values this model computes, what to say): a checkpoint with any other value is refused
_MUST_BE = (
    ("normalization", ("RMSNorm",), "RMSNorm (LLaMA's norm; LayerNorm is another model)"),
    ("swiglu", (True,), "true (SwiGLU, LLaMA's activation)"),
    ("squared_relu", (None, False), "false (LLaMA's activation is SwiGLU)"),
    ("quick_geglu", (None, False), "false (LLaMA's activation is SwiGLU)"),
    ("openai_gelu", (None, False), "false (LLaMA's activation is SwiGLU)"),
    ("untie_embeddings_and_output_weights", (True,), "true (LLaMA2's output layer is its own matrix, not tied "
                                                      "to the embedding)"),
    ("add_bias_linear", (None, False), "false (LLaMA has no biases)"),
    ("add_qkv_bias", (None, False), "false (LLaMA has no biases)"),
    ("num_experts", (None, 0, 1), "none (mixture-of-experts layers are another model)"),
    ("num_moe_experts", (None, 0, 1), "none (mixture-of-experts layers are another model)"),
    ("rotary_percent", (None, 1.0), "1.0 (RoPE over the whole head)"),
    ("rotary_interleaved", (None, False), "false (RoPE rotating halves, as LLaMA's Hugging Face weights do)"),
    ("apply_layernorm_1p", (None, False), "false (a norm weight stored as weight - 1)"),
    ("layernorm_zero_centered_gamma", (None, False), "false (a norm weight stored as weight - 1)"),
    ("qk_layernorm", (None, False), "false (no query/key norms in LLaMA2)"),
    ("multi_latent_attention", (None, False), "false (multi-latent attention is another model)"),
    ("mtp_num_layers", (None, 0), "none (multi-token prediction layers are another model)"),
    ("apply_residual_connection_post_layernorm", (None, False), "false (LLaMA is pre-norm)"),
    ("window_size", (None,), "none (full causal attention)"),
    ("attention_output_gate", (None, False), "false"),
    ("softmax_type", (None, "vanilla"), "vanilla"),
    ("softmax_scale", (None,), "none (1/sqrt(head_dim))"),
    ("no_rope_freq", (None,), "none (RoPE in every layer)"),
    ("yarn_correction_range_round_to_int", (None, True), "true (the correction range rounded, as Megatron's "
                                                          "default and Hugging Face's)"),
)


def _get(args, name, default=None):
    return getattr(args, name, default)


def model_config_from_args(args, where: str) -> ModelConfig:
    """The ModelConfig `args` describe, its vocabulary still padded (`vocab_size` = padded_vocab_size);
    ConvertError naming the first field this model cannot represent."""
    if not isinstance(args, argparse.Namespace):
        raise ConvertError(f"{where}: its 'args' is a {type(args).__name__}, not Megatron-LM's argparse.Namespace")
    for field, allowed, supported in _MUST_BE:
        value = _get(args, field)
        if field in ("swiglu", "normalization", "untie_embeddings_and_output_weights") and value is None:
            value = {"swiglu": False, "normalization": "LayerNorm", "untie_embeddings_and_output_weights": False}[field]
        if value not in allowed:
            raise ConvertError(f"{where}: args.{field} is {value!r}; this LLaMA2 model supports {supported}")
    kind = _get(args, "position_embedding_type")
    if kind is None and _get(args, "use_rotary_position_embeddings"):
        kind = "rope"
    if kind not in ("rope", "yarn"):
        raise ConvertError(f"{where}: args.position_embedding_type is {kind!r}; this LLaMA2 model supports 'rope' "
                           "(or 'yarn'); learned or no position embeddings are another model")
    for field in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "padded_vocab_size"):
        if not isinstance(_get(args, field), int) or _get(args, field) <= 0:
            raise ConvertError(f"{where}: args.{field} is {_get(args, field)!r}; expected a positive integer")
    heads, hidden = args.num_attention_heads, args.hidden_size
    groups = args.num_query_groups if _get(args, "group_query_attention") and _get(args, "num_query_groups") else heads
    if hidden % heads or heads % groups:
        raise ConvertError(f"{where}: args.num_attention_heads {heads}, num_query_groups {groups}, hidden_size "
                           f"{hidden}: the heads must divide hidden_size and the query groups the heads")
    if _get(args, "kv_channels") not in (None, hidden // heads):
        raise ConvertError(f"{where}: args.kv_channels is {args.kv_channels!r}; this LLaMA2 model supports "
                           f"hidden_size / num_attention_heads = {hidden // heads}")
    epsilon = _epsilon(args, where)
    rope = dict(rotary_base=float(_get(args, "rotary_base", 10000)))
    if _get(args, "rotary_seq_len_interpolation_factor") not in (None, 1):
        rope["rotary_seq_len_interpolation_factor"] = float(args.rotary_seq_len_interpolation_factor)
    if _get(args, "use_rope_scaling"):
        rope.update(use_rope_scaling=True, rope_scaling_factor=float(_get(args, "rope_scaling_factor", 8.0)),
                    **_LLAMA3_FIXED)
    if kind == "yarn":
        rope.update(position_embedding_type="yarn", yarn_rotary_scaling_factor=float(args.rotary_scaling_factor),
                    yarn_original_max_position_embeddings=int(args.yarn_original_max_position_embeddings),
                    yarn_beta_fast=float(_get(args, "yarn_beta_fast") or 32.0),
                    yarn_beta_slow=float(_get(args, "yarn_beta_slow") or 1.0),
                    yarn_mscale=float(_get(args, "mscale", 1.0)), yarn_mscale_all_dim=float(_get(args, "mscale_all_dim", 0.0)))
    return ModelConfig(
        num_layers=args.num_layers, hidden_size=hidden, num_attention_heads=heads,
        group_query_attention=groups != heads, num_query_groups=groups if groups != heads else None,
        ffn_hidden_size=args.ffn_hidden_size,
        max_position_embeddings=_get(args, "max_position_embeddings") or _get(args, "seq_length"),
        norm_epsilon=epsilon, vocab_size=args.padded_vocab_size, make_vocab_size_divisible_by=1,
        init_method_std=float(_get(args, "init_method_std", 0.02)), **rope)


def _epsilon(args, where: str) -> float:
    # Megatron-LM saves it as layernorm_epsilon since 2026-01 (TransformerConfig's name), norm_epsilon before
    found = {n: _get(args, n) for n in ("layernorm_epsilon", "norm_epsilon") if _get(args, n) is not None}
    if len(set(found.values())) > 1:
        raise ConvertError(f"{where}: args.layernorm_epsilon {found['layernorm_epsilon']} and args.norm_epsilon "
                           f"{found['norm_epsilon']} disagree")
    return float(next(iter(found.values()), 1e-5))


def true_vocab_size(args, tokenizer_vocab: int | None, where: str) -> int:
    """Rows of the embedding that are real tokens: the tokenizer's size when it is known (checked to be
    the size Megatron-LM padded to `padded_vocab_size`), else every padded row."""
    padded = args.padded_vocab_size
    if tokenizer_vocab is None:
        return padded
    divisible = _get(args, "make_vocab_size_divisible_by") or 128
    tp = _get(args, "tensor_model_parallel_size") or 1
    if tokenizer_vocab > padded or padded_vocab(tokenizer_vocab, divisible, tp) != padded:
        raise ConvertError(f"{where}: the tokenizer has {tokenizer_vocab} pieces, which Megatron-LM pads to "
                           f"{padded_vocab(tokenizer_vocab, divisible, tp)} (make_vocab_size_divisible_by {divisible} "
                           f"x TP {tp}), but the checkpoint's embedding has {padded} rows: not this model's tokenizer")
    return tokenizer_vocab


def args_from_model_config(cfg: ModelConfig, *, tp: int, pp: int, divisible_by: int, ckpt_format: str,
                           transformer_impl: str, dtype: torch.dtype) -> argparse.Namespace:
    """The args a Megatron-LM checkpoint of `cfg` carries: the architecture (what `--use-checkpoint-args`
    copies), the vocabulary and the parallel sizes it was written for."""
    heads, groups = cfg.num_attention_heads, cfg.kv_heads
    # Megatron-LM's --rotary-base is an int
    base = int(cfg.rotary_base) if float(cfg.rotary_base).is_integer() else cfg.rotary_base
    rope = dict(position_embedding_type="rope", use_rotary_position_embeddings=True, rotary_base=base,
                rotary_percent=1.0, rotary_interleaved=False,
                rotary_seq_len_interpolation_factor=cfg.rotary_seq_len_interpolation_factor,
                use_rope_scaling=cfg.use_rope_scaling, rope_scaling_factor=cfg.rope_scaling_factor)
    if cfg.use_rope_scaling and any(getattr(cfg, k) != v for k, v in _LLAMA3_FIXED.items()):
        raise ConvertError("RoPE llama3 scaling with low/high frequency factors or original length other than "
                           "Megatron-LM's fixed 1, 4 and 8192: Megatron-LM cannot represent it")
    if cfg.position_embedding_type == "yarn":
        rope.update(position_embedding_type="yarn", rotary_scaling_factor=cfg.yarn_rotary_scaling_factor,
                    yarn_original_max_position_embeddings=cfg.yarn_original_max_position_embeddings,
                    yarn_beta_fast=cfg.yarn_beta_fast, yarn_beta_slow=cfg.yarn_beta_slow, mscale=cfg.yarn_mscale,
                    mscale_all_dim=cfg.yarn_mscale_all_dim, yarn_correction_range_round_to_int=True)
    return argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_size,
        num_attention_heads=heads, group_query_attention=groups != heads, num_query_groups=groups,
        kv_channels=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        normalization="RMSNorm", norm_epsilon=cfg.norm_epsilon, layernorm_epsilon=cfg.norm_epsilon, swiglu=True,
        untie_embeddings_and_output_weights=True, add_bias_linear=False, add_qkv_bias=False, num_experts=None,
        # LLaMA has no dropout (Megatron-LM's defaults are 0.1)
        hidden_dropout=0.0, attention_dropout=0.0,
        vocab_size=cfg.vocab_size, make_vocab_size_divisible_by=divisible_by,
        padded_vocab_size=padded_vocab(cfg.vocab_size, divisible_by, tp), tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None,
        num_layers_per_virtual_pipeline_stage=None, init_method_std=cfg.init_method_std,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, ckpt_format=ckpt_format,
        transformer_impl=transformer_impl, iteration=0, consumed_train_samples=0, consumed_valid_samples=0, **rope)
