"""Hugging Face <-> megatron_mellama: parameter names and model configuration.

Our names are Hugging Face's `LlamaForCausalLM` names without the `model.` prefix of the
backbone, and the math is the same (rotate-half RoPE), so weights move without reordering.
"""

from __future__ import annotations

import math

from ..config import ModelConfig
from . import rope as rope_tables

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


# the keys each rope_type may carry (beside rope_type / type and rope_theta), as transformers reads them
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate"),
}


def _rope_settings(hf: dict) -> dict:
    """ModelConfig's RoPE fields from transformers 5's `rope_parameters` or 4's `rope_theta` + `rope_scaling`."""
    theta, found = hf.get("rope_theta"), None
    for field in ("rope_scaling", "rope_parameters"):
        rope = hf.get(field)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise _refuse(field, rope, "null or a dict with rope_type " + ", ".join(_ROPE_KEYS))
        if "rope_theta" in rope:
            if theta is not None and float(theta) != float(rope["rope_theta"]):
                raise _refuse(f"{field}.rope_theta", rope["rope_theta"], f"the same as rope_theta ({theta})")
            theta = rope["rope_theta"]
        scaling = _rope_scaling(field, rope, hf["max_position_embeddings"])
        if found is not None and scaling != found[1]:
            raise ValueError(f"{field} is {rope!r}, but {found[0]} says otherwise ({hf[found[0]]!r})")
        found = (field, scaling)
    return dict(rotary_base=float(10000.0 if theta is None else theta), **(found[1] if found is not None else {}))


def _rope_scaling(field: str, rope: dict, max_positions: int) -> dict:
    """The ModelConfig fields of one rope_scaling / rope_parameters dict."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in _ROPE_KEYS:
        raise _refuse(f"{field}.rope_type", kind, ", ".join(_ROPE_KEYS) + " (RoPE scalings this model computes)")
    extra = sorted(set(rope) - {"rope_type", "type", "rope_theta"} - set(_ROPE_KEYS[kind]))
    if extra:
        raise _refuse(f"{field}.{extra[0]}", rope[extra[0]], f"only {', '.join(_ROPE_KEYS[kind]) or 'rope_theta'} "
                      f"with rope_type {kind}")

    def need(key):
        if rope.get(key) is None:
            raise _refuse(f"{field}.{key}", None, f"a number (rope_type {kind} needs it)")
        return rope[key]

    if kind == "linear":
        return dict(rotary_seq_len_interpolation_factor=float(need("factor")))
    # transformers takes a missing original length to be max_position_embeddings
    original = rope.get("original_max_position_embeddings") or max_positions
    if kind == "llama3":
        return dict(use_rope_scaling=True, rope_scaling_factor=float(need("factor")),
                    rope_scaling_low_freq_factor=float(need("low_freq_factor")),
                    rope_scaling_high_freq_factor=float(need("high_freq_factor")),
                    rope_scaling_original_max_position_embeddings=int(original))
    if kind == "yarn":
        return _yarn_settings(field, rope, original, max_positions)
    return {}


def _yarn_settings(field: str, rope: dict, original: int, max_positions: int) -> dict:
    if rope.get("truncate", True) is not True:
        raise _refuse(f"{field}.truncate", rope["truncate"], "true (the correction range rounded to whole dimensions)")
    factor = rope.get("factor")
    factor = float(max_positions / original if factor is None else factor)
    # transformers reads mscale and mscale_all_dim only when both are set, and an explicit
    # attention_factor before either; ours is Megatron-LM's ratio of the two
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if rope.get("attention_factor") is None and not (mscale and mscale_all_dim):
        mscale, mscale_all_dim = 1.0, 0.0
    mscale = 1.0 if mscale is None else float(mscale)
    mscale_all_dim = 0.0 if mscale_all_dim is None else float(mscale_all_dim)
    implied = rope_tables.yarn_attention_factor(factor, mscale, mscale_all_dim)
    if rope.get("attention_factor") is not None and not math.isclose(rope["attention_factor"], implied,
                                                                     rel_tol=1e-9):
        raise _refuse(f"{field}.attention_factor", rope["attention_factor"],
                      f"absent, or the value factor, mscale and mscale_all_dim give ({implied})")
    return dict(position_embedding_type="yarn", yarn_rotary_scaling_factor=factor,
                yarn_original_max_position_embeddings=int(original),
                yarn_beta_fast=float(rope.get("beta_fast") or 32.0), yarn_beta_slow=float(rope.get("beta_slow") or 1.0),
                yarn_mscale=mscale, yarn_mscale_all_dim=mscale_all_dim)


def _hf_rope(cfg: ModelConfig) -> dict:
    """`cfg`'s RoPE as the config.json fields transformers reads."""
    kind = rope_tables.kind(cfg)
    if kind == "default":
        return dict(rope_theta=cfg.rotary_base)
    if kind == "linear":
        scaling = dict(rope_type="linear", factor=cfg.rotary_seq_len_interpolation_factor)
    elif kind == "llama3":
        scaling = dict(rope_type="llama3", factor=cfg.rope_scaling_factor,
                       low_freq_factor=cfg.rope_scaling_low_freq_factor,
                       high_freq_factor=cfg.rope_scaling_high_freq_factor,
                       original_max_position_embeddings=cfg.rope_scaling_original_max_position_embeddings)
    else:
        factor = cfg.yarn_rotary_scaling_factor
        # the attention factor written out: transformers' own rule reads mscale and mscale_all_dim
        # differently from Megatron-LM's when only one of them is set
        scaling = dict(rope_type="yarn", factor=factor,
                       original_max_position_embeddings=cfg.yarn_original_max_position_embeddings,
                       beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow, mscale=cfg.yarn_mscale,
                       mscale_all_dim=cfg.yarn_mscale_all_dim,
                       attention_factor=rope_tables.yarn_attention_factor(factor, cfg.yarn_mscale,
                                                                          cfg.yarn_mscale_all_dim))
    # transformers 5 reads rope_parameters, 4 reads rope_scaling (5 prefers it when both are there)
    return dict(rope_theta=cfg.rotary_base, rope_scaling=scaling,
                rope_parameters=dict(scaling, rope_theta=cfg.rotary_base))


def model_config_from_hf(hf: dict) -> ModelConfig:
    """A LlamaConfig (as its config.json dict) -> ModelConfig; ValueError names any field it cannot represent.

    Every field is accounted for; none is dropped silently:
    - read: num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads (dividing the heads),
      intermediate_size, max_position_embeddings, rms_norm_eps, vocab_size, rope_theta, and
      rope_scaling (transformers 4) / rope_parameters (transformers 5) of rope_type default, linear
      (factor), llama3 (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
      or yarn (factor, original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim,
      attention_factor when it is the value those give, truncate true), with a rope_theta inside equal
      to any top-level one, and the two fields, when both are there, describing the same RoPE;
    - accepted only at the value our model computes: model_type "llama" (or absent), hidden_act "silu"
      (its alias "swish"), head_dim absent/null or hidden_size / num_attention_heads, any other
      rope_type (dynamic, longrope, su, mrope, ...) or RoPE key refused, naming it,
      attention_bias / mlp_bias / tie_word_embeddings false, sliding_window null,
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
        norm_epsilon=hf.get("rms_norm_eps", 1e-6), vocab_size=hf["vocab_size"],
        init_method_std=hf.get("initializer_range", 0.02), **_rope_settings(hf))


def hf_config_dict(cfg: ModelConfig) -> dict:
    """The LlamaConfig fields that describe `cfg`; a RoPE scaling goes in both rope_parameters and
    rope_scaling, so that transformers 5 and 4 both read it."""
    return dict(
        model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.ffn_size, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_epsilon,
        vocab_size=cfg.padded_vocab_size, hidden_act="silu", tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, initializer_range=cfg.init_method_std, **_hf_rope(cfg))
