"""Megatron-LM's tensor names, every generation of them, reduced to one canonical set and mapped to ours.

A Megatron-LM checkpoint names the same LLaMA tensor in one of several ways:
- megatron-core, local spec (torch format): `decoder.layers.3.input_layernorm.weight`,
  `decoder.layers.3.pre_mlp_layernorm.weight`;
- megatron-core, Transformer Engine spec (torch format), and torch_dist whatever the spec: the two
  norms fused into the next linear, `...linear_qkv.layer_norm_weight`, `...linear_fc1.layer_norm_weight`;
- torch_dist: layer-stacked, no layer number (`decoder.layers.self_attention.linear_qkv.weight`
  with a leading layer axis);
- the legacy model (before megatron-core): `language_model.embedding.word_embeddings.weight`,
  `language_model.encoder.layers.3.self_attention.query_key_value.weight` (`transformer` and
  `attention` in older code), `dense`, `dense_h_to_4h`, `dense_4h_to_h`, the norms
  `input_layernorm` / `post_attention_layernorm` / `final_layernorm` (`input_norm` /
  `post_attention_norm` / `final_norm` from 2023-09), `language_model.output_layer.weight`.
`canonical()` maps each to (layer or None, one canonical name); `_extra_state` (Transformer Engine's
FP8 bookkeeping, None without FP8) carries no weights and is skipped. Any other tensor (a bias, a
learned position embedding, an expert) is refused by the caller, naming it.
"""

from __future__ import annotations

import re

# canonical per-layer names: megatron-core's local spec
QKV = "self_attention.linear_qkv.weight"
PROJ = "self_attention.linear_proj.weight"
FC1 = "mlp.linear_fc1.weight"
FC2 = "mlp.linear_fc2.weight"
INPUT_NORM = "input_layernorm.weight"
MLP_NORM = "pre_mlp_layernorm.weight"
LAYER_TENSORS = (INPUT_NORM, QKV, PROJ, MLP_NORM, FC1, FC2)
# torch_dist with megatron-core's `singleton_local_shards`: fc1's gate and up halves as two keys
FC1_GATE = FC1 + "_w"
FC1_UP = FC1 + "_v"
# canonical whole-model names
EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"

# how each is split over tensor-parallel ranks in the torch format
TP_SPLIT = {EMBEDDING: "rows", OUTPUT: "rows", FINAL_NORM: "replicated", QKV: "rows", PROJ: "columns",
            FC1: "gate_up", FC2: "columns", INPUT_NORM: "replicated", MLP_NORM: "replicated"}

# Transformer Engine spec names (and torch_dist's, whatever the spec) of the two norms
TE_NAMES = {INPUT_NORM: "self_attention.linear_qkv.layer_norm_weight",
            MLP_NORM: "mlp.linear_fc1.layer_norm_weight"}
# the modules whose `_extra_state` each spec's model asks for, per layer
EXTRA_STATE_LOCAL = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
EXTRA_STATE_TE = EXTRA_STATE_LOCAL + ("self_attention.core_attention",)

_LAYER_ALIASES = {
    QKV: QKV, PROJ: PROJ, FC1: FC1, FC2: FC2, INPUT_NORM: INPUT_NORM, MLP_NORM: MLP_NORM,
    FC1_GATE: FC1_GATE, FC1_UP: FC1_UP,
    TE_NAMES[INPUT_NORM]: INPUT_NORM, TE_NAMES[MLP_NORM]: MLP_NORM,
    # legacy
    "self_attention.query_key_value.weight": QKV, "attention.query_key_value.weight": QKV,
    "self_attention.dense.weight": PROJ, "attention.dense.weight": PROJ,
    "mlp.dense_h_to_4h.weight": FC1, "mlp.dense_4h_to_h.weight": FC2,
    "post_attention_layernorm.weight": MLP_NORM,
    # the legacy model's names from its RMSNorm support (2023-09) on
    "input_norm.weight": INPUT_NORM, "post_attention_norm.weight": MLP_NORM,
}
_TOP_ALIASES = {
    EMBEDDING: EMBEDDING, FINAL_NORM: FINAL_NORM, OUTPUT: OUTPUT,
    "language_model.embedding.word_embeddings.weight": EMBEDDING,
    "language_model.encoder.final_layernorm.weight": FINAL_NORM,
    "language_model.encoder.final_norm.weight": FINAL_NORM,
    "language_model.transformer.final_layernorm.weight": FINAL_NORM,
    "language_model.output_layer.weight": OUTPUT,
}
_LAYER = re.compile(r"(?:decoder|language_model\.encoder|language_model\.transformer)\.layers\.(?:(\d+)\.)?(.+)")


def is_extra_state(name: str) -> bool:
    return name.endswith("._extra_state") or "._extra_state/" in name


def canonical(name: str) -> tuple[int | None, str] | None:
    """(layer number as written, or None for a whole-model tensor or a layer-stacked one; canonical
    name), or None when `name` is not a tensor of the LLaMA architecture."""
    if name in _TOP_ALIASES:
        return None, _TOP_ALIASES[name]
    m = _LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER_ALIASES:
        return (int(m.group(1)) if m.group(1) is not None else None), _LAYER_ALIASES[m.group(2)]
    return None


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested state dict (the legacy model's `language_model` nesting) as dotted names."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def ours(layer: int | None, name: str) -> list[str]:
    """Our tensor names that canonical tensor (`layer`, `name`) holds, in the order they are fused."""
    if layer is None:
        return [{EMBEDDING: "embed_tokens.weight", FINAL_NORM: "norm.weight", OUTPUT: "lm_head.weight"}[name]]
    p = f"layers.{layer}."
    return {QKV: [p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"],
            PROJ: [p + "self_attn.o_proj.weight"], FC1: [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
            FC1_GATE: [p + "mlp.gate_proj.weight"], FC1_UP: [p + "mlp.up_proj.weight"],
            FC2: [p + "mlp.down_proj.weight"], INPUT_NORM: [p + "input_layernorm.weight"],
            MLP_NORM: [p + "post_attention_layernorm.weight"]}[name]


def dist_key(name: str) -> str:
    """The torch_dist key of canonical tensor `name` (layer tensors stacked under `decoder.layers.`;
    the norms under Transformer Engine's names, as megatron-core stores them for either spec)."""
    if name in (EMBEDDING, FINAL_NORM, OUTPUT):
        return name
    return "decoder.layers." + TE_NAMES.get(name, name)
