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


# config.json fields that do not change the function the weights compute: bookkeeping, generation
# defaults, token ids, output switches, the attention kernel's name. Accepted whatever their value.
IGNORED_FIELDS = frozenset({
    "_name_or_path", "_commit_hash", "architectures", "transformers_version", "torch_dtype", "dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "use_cache",
    "initializer_range", "output_attentions", "output_hidden_states", "return_dict", "torchscript",
    "use_return_dict", "chunk_size_feed_forward", "id2label", "label2id", "problem_type", "tokenizer_class",
    "prefix", "task_specific_params", "finetuning_task", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "tf_legacy_loss", "pruned_heads", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "attn_implementation", "_attn_implementation",
    "_attn_implementation_autoset", "use_flash_attention_2", "max_sequence_length", "pretraining_tp",
})
# fields read into ModelConfig, or whose only supported value is checked below
_READ_FIELDS = frozenset({
    "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_parameters",
    "rope_scaling", "vocab_size", "head_dim", "hidden_act", "attention_bias", "mlp_bias", "tie_word_embeddings",
    "sliding_window", "use_sliding_window", "attention_dropout", "mlp_dropout", "hidden_dropout",
    "is_encoder_decoder", "is_decoder", "quantization_config",
})
_OFF = (None, False, 0, 0.0)


def _refuse(field: str, value, supported: str) -> ValueError:
    return ValueError(f"{field} is {value!r}; supported: {supported}")


def _rope_theta(hf: dict) -> float:
    """`rope_theta` from transformers 5's `rope_parameters`, or 4's `rope_theta` + `rope_scaling` (default only)."""
    theta = hf.get("rope_theta")
    for field in ("rope_scaling", "rope_parameters"):
        rope = hf.get(field)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise _refuse(field, rope, "null or {\"rope_type\": \"default\", \"rope_theta\": ...}")
        kind = rope.get("rope_type", rope.get("type", "default"))
        extra = sorted(set(rope) - {"rope_type", "type", "rope_theta"})
        if kind != "default" or extra:
            raise _refuse(field, rope, "plain RoPE only, {\"rope_type\": \"default\", \"rope_theta\": ...} "
                          "(no RoPE scaling)")
        if "rope_theta" in rope:
            if theta is not None and float(theta) != float(rope["rope_theta"]):
                raise _refuse(f"{field}.rope_theta", rope["rope_theta"], f"the same as rope_theta ({theta})")
            theta = rope["rope_theta"]
    return float(10000.0 if theta is None else theta)


def model_config_from_hf(hf: dict) -> ModelConfig:
    """A LlamaConfig (as its config.json dict) -> ModelConfig; ValueError names any field it cannot represent.

    Every field is accounted for; none is dropped silently:
    - read: num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads (dividing the heads),
      intermediate_size, max_position_embeddings, rms_norm_eps, vocab_size, rope_theta;
    - accepted only at the value our model computes: model_type "llama" (or absent), hidden_act "silu"
      (its alias "swish"), head_dim absent/null or hidden_size / num_attention_heads, rope_scaling and
      rope_parameters null or plain RoPE (`{"rope_type": "default", "rope_theta": ...}`, equal to any
      top-level rope_theta), attention_bias / mlp_bias / tie_word_embeddings false, sliding_window null,
      use_sliding_window false, attention_dropout / mlp_dropout / hidden_dropout 0, is_encoder_decoder /
      is_decoder false, no quantization_config;
    - ignored, whatever their value (they do not change the function): `IGNORED_FIELDS`, e.g. dtype,
      architectures, token ids, use_cache, initializer_range (kept as the init std), generation defaults,
      and pretraining_tp (transformers' split of the same matmuls into slices);
    - any other field is refused: it may change the function, and we cannot tell.
    """
    unknown = sorted(set(hf) - IGNORED_FIELDS - _READ_FIELDS)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]}={hf[unknown[0]]!r}"
                         + (f" (and {len(unknown) - 1} more: {', '.join(unknown[1:4])}"
                            f"{', ...' if len(unknown) > 4 else ''})" if len(unknown) > 1 else "")
                         + "; it may change what the model computes, and this LLaMA2 converter cannot represent it")
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"model_type is '{hf.get('model_type')}', not 'llama'")
    if hf.get("tie_word_embeddings", False):
        raise ValueError("tie_word_embeddings is true; LLaMA2 has an untied output layer")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise _refuse("hidden_act", hf["hidden_act"], "'silu' (SwiGLU)")
    for field in ("attention_bias", "mlp_bias", "is_encoder_decoder", "is_decoder", "use_sliding_window"):
        if hf.get(field, False) is not False:
            raise _refuse(field, hf[field], "false")
    for field in ("sliding_window", "quantization_config"):
        if hf.get(field) is not None:
            raise _refuse(field, hf[field], "null (absent)")
    for field in ("attention_dropout", "mlp_dropout", "hidden_dropout"):
        if hf.get(field, 0) not in _OFF:
            raise _refuse(field, hf[field], "0")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    kv_heads = hf.get("num_key_value_heads") or heads
    if heads <= 0 or hidden % heads or kv_heads <= 0 or heads % kv_heads:
        raise ValueError(f"num_attention_heads {heads}, num_key_value_heads {kv_heads}, hidden_size {hidden}: "
                         "the heads must divide hidden_size and the key/value heads the heads")
    if hf.get("head_dim") is not None and hf["head_dim"] != hidden // heads:
        raise _refuse("head_dim", hf["head_dim"], f"hidden_size / num_attention_heads = {hidden // heads}")
    return ModelConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hidden, num_attention_heads=heads,
        group_query_attention=kv_heads != heads, num_query_groups=kv_heads if kv_heads != heads else None,
        ffn_hidden_size=hf["intermediate_size"], max_position_embeddings=hf["max_position_embeddings"],
        norm_epsilon=hf.get("rms_norm_eps", 1e-6), rotary_base=_rope_theta(hf),
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
