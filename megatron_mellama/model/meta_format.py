"""Meta's original LLaMA2 release (`params.json` + `consolidated.NN.pth`) -> Hugging Face names and layout.

Meta's model-parallel shards split each matrix the way its Fairscale layers did: column-parallel
matrices (wq, wk, wv, w1, w3, output) along dim 0, row-parallel ones (wo, w2) along dim 1, the
embedding along dim 1; norms are replicated. Meta's RoPE rotates interleaved pairs (2i, 2i+1) of
each head, Hugging Face's (and ours) rotate halves (i, i + head_dim/2): q and k rows are permuted
once, here, exactly as transformers' `convert_llama_weights_to_hf.py` does.
"""

from __future__ import annotations

import re

import torch

_LAYER = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_TOP = {"tok_embeddings.weight": ("embed_tokens.weight", 1), "norm.weight": ("norm.weight", None),
        "output.weight": ("lm_head.weight", 0)}
# buffers some releases carry; not parameters
SKIPPED = ("rope.freqs",)


def meta_to_ours(name: str) -> tuple[str, int | None]:
    """Meta's tensor name -> (our name, the dim its model-parallel shards are concatenated along, or None)."""
    if name in _TOP:
        return _TOP[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER:
        ours, dim = _LAYER[m.group(2)]
        return f"layers.{m.group(1)}.{ours}", dim
    raise KeyError(f"'{name}' is not a tensor of Meta's LLaMA checkpoint format")


def ffn_size(dim: int, multiple_of: int, multiplier: float | None) -> int:
    """Meta's FeedForward width rule (llama/model.py)."""
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def hf_config_from_params(params: dict, vocab_size: int) -> dict:
    """params.json (+ the vocabulary size the embedding has: releases write -1) -> config.json fields."""
    heads = params["n_heads"]
    return dict(model_type="llama", num_hidden_layers=params["n_layers"], hidden_size=params["dim"],
                num_attention_heads=heads, num_key_value_heads=params.get("n_kv_heads") or heads,
                intermediate_size=ffn_size(params["dim"], params.get("multiple_of", 256),
                                           params.get("ffn_dim_multiplier")),
                max_position_embeddings=params.get("max_seq_len", 4096), rms_norm_eps=params.get("norm_eps", 1e-5),
                rope_theta=params.get("rope_theta", 10000.0), vocab_size=vocab_size, tie_word_embeddings=False)


def interleaved_to_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q/k in Meta's interleaved-pair order -> rotate-half order (transformers' `permute`)."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `interleaved_to_half` (what Meta's layout is, given ours)."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)
