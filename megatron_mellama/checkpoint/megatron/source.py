"""A Megatron-LM checkpoint seen as our tensors, one at a time: what `convert.import_checkpoint` reads.

A format's reader (`dist_source.py`, `torch_source.py`) indexes its canonical tensors (`names.py`:
one global tensor per layer and name, whatever the TP/PP it was saved with) and reads one on demand.
This class splits them into ours: QKV into q/k/v, fc1 into gate/up, the padded vocabulary rows
dropped. The last canonical tensor read is kept, so q, k and v (and gate and up) written one after
the other read it once.
"""

from __future__ import annotations

import dataclasses

import torch

from ...models import model_spec
from ..sources import ConvertError
from . import names
from .args import model_config_from_args, true_vocab_size
from .layouts import split_gate_up, split_qkv


class MegatronSource:
    """`names`, `shapes`, `dtypes`, `load(name)`, `source_name(name)`, `hf_config`, `dir` (convert's source).

    A subclass calls `_index(found)` with {(global layer or None, canonical name): (shape, dtype,
    where)} and implements `_read(layer, canonical name) -> global tensor`."""

    def __init__(self, directory: str, args, tokenizer_vocab: int | None, where: str):
        self.dir = directory
        self.where = where
        self.args = args
        cfg = model_config_from_args(args, where)
        self.vocab_size = true_vocab_size(args, tokenizer_vocab, where)
        self.cfg = dataclasses.replace(cfg, vocab_size=self.vocab_size)
        self.hf_config = model_spec().hf.config_to_hf(self.cfg)
        self._last: tuple | None = None

    def _index(self, found: dict) -> None:
        cfg = self.cfg
        layers = cfg.num_layers
        for (layer, name), (_, _, where) in found.items():
            if layer is not None and not 0 <= layer < layers:
                raise ConvertError(f"{where}: layer {layer}, but args.num_layers is {layers}")
        fc1_halves = any(name in (names.FC1_GATE, names.FC1_UP) for _, name in found)
        per_layer = [n for n in names.LAYER_TENSORS if not (fc1_halves and n == names.FC1)]
        if fc1_halves:
            per_layer += [names.FC1_GATE, names.FC1_UP]
        want = [(None, names.EMBEDDING)] + [(i, n) for i in range(layers) for n in per_layer] + [
            (None, names.FINAL_NORM), (None, names.OUTPUT)]
        missing = [key for key in want if key not in found]
        if missing:
            layer, name = missing[0]
            raise ConvertError(f"{self.where}: no {name}" + (f" for layer {layer}" if layer is not None else "")
                               + (f" (and {len(missing) - 1} more tensors)" if len(missing) > 1 else ""))
        self._found = found
        self._ours: dict[str, tuple] = {}  # our name -> (layer, canonical name, part)
        self.shapes, self.dtypes = {}, {}
        for layer, name in want:
            shape, dtype, _ = found[(layer, name)]
            for part, (ours, part_shape) in enumerate(zip(names.ours(layer, name), self._part_shapes(name, shape))):
                self._ours[ours] = (layer, name, part)
                self.shapes[ours], self.dtypes[ours] = part_shape, dtype
        self.names = list(self._ours)

    def _part_shapes(self, name: str, shape: tuple) -> list[tuple]:
        cfg = self.cfg
        if name == names.QKV:
            d = cfg.head_dim
            return [(cfg.num_attention_heads * d, shape[1]), (cfg.kv_heads * d, shape[1]), (cfg.kv_heads * d, shape[1])]
        if name == names.FC1:
            return [(shape[0] // 2, shape[1])] * 2
        if name in (names.EMBEDDING, names.OUTPUT):
            if shape[0] < self.vocab_size:
                raise ConvertError(f"{self._found[(None, name)][2]}: {shape[0]} rows, fewer than the vocabulary "
                                   f"({self.vocab_size})")
            return [(self.vocab_size,) + tuple(shape[1:])]
        return [tuple(shape)]

    def source_name(self, name: str) -> str:
        layer, canonical, _ = self._ours[name]
        return self._found[(layer, canonical)][2]

    def load(self, name: str) -> torch.Tensor:
        layer, canonical, part = self._ours[name]
        if self._last is None or self._last[0] != (layer, canonical):
            self._last = None  # free the previous tensor before reading the next
            tensor = self._read(layer, canonical)
            want = self._found[(layer, canonical)][0]
            if tuple(tensor.shape) != tuple(want):
                raise ConvertError(f"{self.source_name(name)}: read shape {list(tensor.shape)}, indexed {list(want)}")
            self._last = ((layer, canonical), self._split(canonical, tensor))
        return self._last[1][part]

    def _split(self, name: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        if name == names.QKV:
            return list(split_qkv(tensor, self.cfg.num_attention_heads, self.cfg.kv_heads))
        if name == names.FC1:
            return list(split_gate_up(tensor))
        if name in (names.EMBEDDING, names.OUTPUT):
            return [tensor[:self.vocab_size]]
        return [tensor]

    def _read(self, layer: int | None, name: str) -> torch.Tensor:
        raise NotImplementedError
