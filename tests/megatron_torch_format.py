"""Megatron-LM's `torch` checkpoint format: one `model_optim_rng.pt` per model-parallel rank.

The model entry is the rank's `state_dict_for_save_checkpoint()` under one of three namings:
- "mcore": megatron-core's local spec, as the model gives it (`decoder.layers.N.input_layernorm.weight`,
  `pre_mlp_layernorm.weight`, `..._extra_state`);
- "te": megatron-core's Transformer Engine spec (`get_gpt_layer_with_transformer_engine_spec`): the
  norms fused into the following linear layer (`self_attention.linear_qkv.layer_norm_weight`,
  `mlp.linear_fc1.layer_norm_weight`), an `_extra_state` on every TE module including
  `self_attention.core_attention`, and on the final norm from Transformer Engine 2 (its RMSNorm is
  a fusible operation with extra state); the output layer stays megatron-core's own (None);
- "legacy": Megatron-LM's pre-megatron-core GPT model (megatron/legacy/model, last present at
  39ec5ebeb4^): `language_model.embedding.word_embeddings.weight`, `language_model.encoder`
  with `layers.N.input_norm`, `self_attention.query_key_value`, `self_attention.dense`,
  `post_attention_norm`, `mlp.dense_h_to_4h`, `mlp.dense_4h_to_h` and `final_norm` (the names
  since the RMSNorm support of 2023-09), and `language_model.output_layer.weight`; its linear
  layers are megatron-core's, whose `_extra_state` is None.
The per-rank tensors are the same in all three: QKV interleaved per query group, fc1 `[gate_r; up_r]`.
"""

from __future__ import annotations

import collections
import io
import re

import torch

LAYER_KEY = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def rank_file_name(tp_rank: int, pp_rank: int, pipeline: bool) -> str:
    """get_checkpoint_name's per-rank path inside the iteration folder."""
    folder = f"mp_rank_{tp_rank:02d}_{pp_rank:03d}" if pipeline else f"mp_rank_{tp_rank:02d}"
    return f"{folder}/model_optim_rng.pt"


def extra_state_value(kind: str):
    """A Transformer Engine module's `_extra_state` without FP8: TE 2.x an empty byte tensor, TE 1.x
    a BytesIO holding torch.save(None); megatron-core's local layers give None."""
    if kind == "tensor":
        return torch.empty(0, dtype=torch.uint8)
    if kind == "bytesio":
        buffer = io.BytesIO()
        torch.save(None, buffer)
        return buffer
    return None


def _layers(state: dict) -> dict:
    """{local layer index: {name inside the layer: value}}, in layer order."""
    layers = collections.defaultdict(dict)
    for key, value in state.items():
        match = LAYER_KEY.fullmatch(key)
        if match:
            layers[int(match.group(1))][match.group(2)] = value
    return dict(sorted(layers.items()))


def mcore_names(state: dict, extra_state: str) -> dict:
    return collections.OrderedDict(
        (key, extra_state_value(extra_state) if key.endswith("._extra_state") else value)
        for key, value in state.items())


def te_names(state: dict, extra_state: str) -> dict:
    out = collections.OrderedDict()
    if "embedding.word_embeddings.weight" in state:
        out["embedding.word_embeddings.weight"] = state["embedding.word_embeddings.weight"]
    for n, layer in _layers(state).items():
        p = f"decoder.layers.{n}."
        out[p + "self_attention.core_attention._extra_state"] = extra_state_value(extra_state)
        out[p + "self_attention.linear_proj.weight"] = layer["self_attention.linear_proj.weight"]
        out[p + "self_attention.linear_proj._extra_state"] = extra_state_value(extra_state)
        out[p + "self_attention.linear_qkv.layer_norm_weight"] = layer["input_layernorm.weight"]
        out[p + "self_attention.linear_qkv.weight"] = layer["self_attention.linear_qkv.weight"]
        out[p + "self_attention.linear_qkv._extra_state"] = extra_state_value(extra_state)
        out[p + "mlp.linear_fc1.layer_norm_weight"] = layer["pre_mlp_layernorm.weight"]
        out[p + "mlp.linear_fc1.weight"] = layer["mlp.linear_fc1.weight"]
        out[p + "mlp.linear_fc1._extra_state"] = extra_state_value(extra_state)
        out[p + "mlp.linear_fc2.weight"] = layer["mlp.linear_fc2.weight"]
        out[p + "mlp.linear_fc2._extra_state"] = extra_state_value(extra_state)
    if "decoder.final_layernorm.weight" in state:
        out["decoder.final_layernorm.weight"] = state["decoder.final_layernorm.weight"]
        if extra_state == "tensor":
            out["decoder.final_layernorm._extra_state"] = extra_state_value(extra_state)
    if "output_layer.weight" in state:
        out["output_layer.weight"] = state["output_layer.weight"]
        out["output_layer._extra_state"] = None
    return out


def legacy_names(state: dict) -> dict:
    language_model = {}
    if "embedding.word_embeddings.weight" in state:
        language_model["embedding"] = {"word_embeddings": {"weight": state["embedding.word_embeddings.weight"]}}
    encoder = collections.OrderedDict()
    for n, layer in _layers(state).items():
        p = f"layers.{n}."
        encoder[p + "input_norm.weight"] = layer["input_layernorm.weight"]
        encoder[p + "self_attention.query_key_value.weight"] = layer["self_attention.linear_qkv.weight"]
        encoder[p + "self_attention.query_key_value._extra_state"] = None
        encoder[p + "self_attention.dense.weight"] = layer["self_attention.linear_proj.weight"]
        encoder[p + "self_attention.dense._extra_state"] = None
        encoder[p + "post_attention_norm.weight"] = layer["pre_mlp_layernorm.weight"]
        encoder[p + "mlp.dense_h_to_4h.weight"] = layer["mlp.linear_fc1.weight"]
        encoder[p + "mlp.dense_h_to_4h._extra_state"] = None
        encoder[p + "mlp.dense_4h_to_h.weight"] = layer["mlp.linear_fc2.weight"]
        encoder[p + "mlp.dense_4h_to_h._extra_state"] = None
    if "decoder.final_layernorm.weight" in state:
        encoder["final_norm.weight"] = state["decoder.final_layernorm.weight"]
    language_model["encoder"] = encoder
    if "output_layer.weight" in state:
        language_model["output_layer"] = collections.OrderedDict(
            weight=state["output_layer.weight"], _extra_state=None)
    return {"language_model": language_model}


def named_model_state(chunk, names: str, extra_state: str) -> dict:
    state = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
             for k, v in chunk.state_dict_for_save_checkpoint().items()}
    if names == "te":
        return te_names(state, extra_state)
    if names == "legacy":
        return legacy_names(state)
    return mcore_names(state, extra_state)


def torch_format_state(spec: dict, args, chunks: list, model_keys: list, optimizer: dict, rng_state: dict,
                       scheduler: dict) -> dict:
    """generate_state_dict's dictionary for ckpt_format torch, as save_checkpoint torch.saves it
    (`optimizer`: the FP32Optimizer's state_dict, which is its torch optimizer's)."""
    state = {"args": args, "checkpoint_version": 3.0, "iteration": spec["iteration"]}
    for key, chunk in zip(model_keys, chunks):
        state[key] = named_model_state(chunk, spec["names"], spec["extra_state"])
    state["optimizer"] = optimizer
    state["opt_param_scheduler"] = scheduler
    state["rng_state"] = [rng_state]
    state["num_floating_point_operations_so_far"] = 1.5e12 * spec["iteration"]
    return state
