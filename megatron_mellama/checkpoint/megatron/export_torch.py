"""The torch-format writer: Megatron-LM's `--ckpt-format torch`, one file per model-parallel rank.

`iter_0000000/mp_rank_TT/model_optim_rng.pt` (with pipeline stages, `mp_rank_TT_PPP/`), each
`torch.save({'args', 'checkpoint_version': 3.0, 'iteration': 0, 'model': {...}})`, the model entry
in megatron-core's state-dict names for `--transformer-impl`:
- local: `decoder.layers.N.input_layernorm.weight`, `pre_mlp_layernorm.weight`, and `_extra_state`
  None for the linear layers and the output layer (what megatron-core's local spec gives where
  Transformer Engine is not installed; where it is, the final norm also has an extra state, and
  Megatron-LM's load falls back to a non-strict load for it);
- transformer_engine: the norms fused into the next linear (`self_attention.linear_qkv.layer_norm_weight`,
  `mlp.linear_fc1.layer_norm_weight`), `_extra_state` an empty uint8 tensor (Transformer Engine 2's
  extra state without FP8) for every TE module (the linear layers, the core attention, the final
  norm), and None for the output layer (megatron-core's own linear).
Layer numbers are local to the pipeline stage (stage p holds layers [p*L/P, (p+1)*L/P)); each TP
rank's share is cut by `layouts.split_tp` (fc1 as [gate_r; up_r], QKV whole query groups). No
virtual pipeline stages. One rank file's tensors at a time are in memory.
"""

from __future__ import annotations

import os

import torch

from ..convert import _progress
from .layouts import split_tp
from .names import (EMBEDDING, EXTRA_STATE_LOCAL, EXTRA_STATE_TE, FINAL_NORM, LAYER_TENSORS, OUTPUT, TE_NAMES,
                    TP_SPLIT)


OUTPUT_MODULE = "output_layer."


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    """Megatron-LM's get_checkpoint_name folder of a model-parallel rank."""
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def _extra_state(transformer_impl: str):
    return torch.empty(0, dtype=torch.uint8) if transformer_impl == "transformer_engine" else None


def rank_names(num_layers: int, pp_rank: int, pp: int, transformer_impl: str) -> list:
    """The model entry's keys of pipeline stage `pp_rank`, in order: (key, layer or None, canonical name)
    for a tensor, (key, None, None) for an `_extra_state`."""
    per_stage = num_layers // pp
    te = transformer_impl == "transformer_engine"
    names = []
    if pp_rank == 0:
        names.append((EMBEDDING, None, EMBEDDING))
    extra_modules = EXTRA_STATE_TE if te else EXTRA_STATE_LOCAL
    for local in range(per_stage):
        layer = pp_rank * per_stage + local
        prefix = f"decoder.layers.{local}."
        for name in LAYER_TENSORS:
            names.append((prefix + (TE_NAMES.get(name, name) if te else name), layer, name))
        names += [(f"{prefix}{m}._extra_state", None, None) for m in extra_modules]
    if pp_rank == pp - 1:
        names.append((FINAL_NORM, None, FINAL_NORM))
        if te:
            names.append(("decoder.final_layernorm._extra_state", None, None))
        names += [(OUTPUT, None, OUTPUT), ("output_layer._extra_state", None, None)]
    return names


def write_torch(source, iteration_dir: str, common: dict, tp: int, pp: int, transformer_impl: str,
                progress: bool) -> None:
    """Write our checkpoint (`source`, an export.OurTensors) as the torch format's rank files."""
    cfg = source.cfg
    total = 0
    for p in range(pp):
        for key, layer, name in rank_names(cfg.num_layers, p, pp, transformer_impl):
            if name is not None:
                numel = torch.Size(source.shape(layer, name)).numel()
                total += numel * (tp if TP_SPLIT[name] == "replicated" else 1)
    bar = _progress(total * source.dtype.itemsize, "export", progress)
    try:
        for p in range(pp):
            for t in range(tp):
                model = {}
                for key, layer, name in rank_names(cfg.num_layers, p, pp, transformer_impl):
                    if name is None:
                        # the output layer is megatron-core's own linear layer in either spec
                        model[key] = None if key.startswith(OUTPUT_MODULE) else _extra_state(transformer_impl)
                        continue
                    # a share is a view of the whole tensor: clone it, or torch.save writes the whole storage
                    model[key] = split_tp(name, source.canonical(layer, name), tp, t).clone()
                    bar.update(model[key].nbytes)
                folder = os.path.join(iteration_dir, rank_dir(t, p, pp))
                os.makedirs(folder)
                path = os.path.join(folder, "model_optim_rng.pt")
                with open(path, "wb") as fh:
                    torch.save(dict(common, model=model), fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                del model
    finally:
        bar.close()
