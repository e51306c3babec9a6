"""Hugging Face <-> megatron_mellama: parameter names and model configuration.

Our names are Hugging Face's `LlamaForCausalLM` names without the `model.` prefix of the
backbone, and the math is the same (rotate-half RoPE), so weights move without reordering.
"""

from __future__ import annotations

from ..config import ModelConfig

_HF_PREFIX = "model."


def to_hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else _HF_PREFIX + name


def from_hf_name(hf_name: str) -> str:
    if hf_name.startswith("lm_head."):
        return hf_name
    if not hf_name.startswith(_HF_PREFIX):
        raise KeyError(f"'{hf_name}' is not a LLaMA parameter name (expected 'model.*' or 'lm_head.*')")
    return hf_name[len(_HF_PREFIX):]


def model_config_from_hf(hf: dict) -> ModelConfig:
    """A LlamaConfig (as its config.json dict) -> ModelConfig."""
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"model_type is '{hf.get('model_type')}', not 'llama'")
    if hf.get("tie_word_embeddings", False):
        raise ValueError("tie_word_embeddings is true; LLaMA2 has an untied output layer")
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    rope = hf.get("rope_parameters") or {}
    return ModelConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], num_attention_heads=heads,
        group_query_attention=kv_heads != heads, num_query_groups=kv_heads if kv_heads != heads else None,
        ffn_hidden_size=hf["intermediate_size"], max_position_embeddings=hf["max_position_embeddings"],
        norm_epsilon=hf.get("rms_norm_eps", 1e-6), rotary_base=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        vocab_size=hf["vocab_size"], init_method_std=hf.get("initializer_range", 0.02))


def hf_config_dict(cfg: ModelConfig) -> dict:
    """The LlamaConfig fields that describe `cfg`."""
    return dict(
        model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.ffn_size, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_epsilon,
        rope_theta=cfg.rotary_base, vocab_size=cfg.padded_vocab_size, hidden_act="silu",
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, initializer_range=cfg.init_method_std)
