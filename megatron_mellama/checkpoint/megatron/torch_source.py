"""Megatron-LM's torch format: one `model_optim_rng.pt` per model-parallel rank, read a tensor at a time.

Each rank file holds its pipeline stage's layers, numbered from 0 within the stage (and within
each virtual stage, `model0`, `model1`, ...), each tensor cut for its tensor-parallel rank
(`layouts.merge_tp` joins them). Stages are put in Megatron's order, virtual stage by virtual
stage and, within one, pipeline rank by pipeline rank; each stage's own layer count places it, so
uneven splits read as they were saved. The files are memory-mapped (the optimizer state in them is
never read) and a tensor is copied out of its files only when the import writes it. Replicated
tensors (the norms) must agree across tensor-parallel ranks: a disagreement is a corrupted file.
"""

from __future__ import annotations

import re

import torch

from ..sources import ConvertError, MappedFiles
from . import names, pickles
from .layouts import merge_tp
from .root import MegatronCheckpoint
from .source import MegatronSource


def _walk(tree: dict, path: tuple = ()):
    """(dotted name, key path, value) of every leaf of a nested state dict."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _walk(value, path + (key,))
        else:
            yield ".".join(map(str, path[1:] + (key,))), path + (key,), value


def _model_keys(state: dict, path: str) -> list[str]:
    """'model', or the virtual stages 'model0', 'model1', ... in order."""
    chunks = sorted((int(k[5:]), k) for k in state if re.fullmatch(r"model\d+", str(k)))
    if chunks:
        return [k for _, k in chunks]
    if "model" not in state:
        raise ConvertError(f"{path}: holds no 'model' (keys: {', '.join(map(str, list(state)[:6]))})")
    return ["model"]


class TorchSource(MegatronSource):
    def __init__(self, ckpt: MegatronCheckpoint, tokenizer_vocab: int | None = None):
        files = ckpt.rank_files
        first_path = files[(0, 0)]
        first = pickles.load(first_path, mmap=True)
        if not isinstance(first, dict) or "args" not in first:
            raise ConvertError(f"{first_path}: holds no 'args' (not saved by Megatron-LM's save_checkpoint); the "
                               "model's configuration cannot be known")
        version = first.get("checkpoint_version", 0)
        if not isinstance(version, (int, float)) or version < 2.0:
            raise ConvertError(f"{first_path}: checkpoint_version {version!r}; this importer reads 2.0 and later "
                               "(earlier Megatron-LM ordered QKV differently)")
        super().__init__(ckpt.directory, first["args"], tokenizer_vocab, first_path)
        self.iteration = first.get("iteration")
        tp = 1 + max(t for t, _ in files)
        pp = 1 + max(p for _, p in files)
        for field, have in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
            saved = getattr(self.args, field, None)
            if saved not in (None, have):
                raise ConvertError(f"{ckpt.directory}: args.{field} is {saved} but there are {have} such rank files")
        # a tensor is joined from T files: drop the mappings sooner than for one-file sources
        self._files = MappedFiles(lambda path: pickles.load(path, mmap=True), remap_bytes=256 << 20)
        self._tp = tp
        stages = {}  # (virtual stage, pipeline rank) -> {(local layer, name): [(path, key path, shape, dtype)] per TP}
        for (t, p), path in sorted(files.items()):
            state = first if (t, p) == (0, 0) else pickles.load(path, mmap=True)
            for v, model_key in enumerate(_model_keys(state, path)):
                stage = stages.setdefault((v, p), {})
                for dotted, keys, value in _walk({model_key: state[model_key]}):
                    if names.is_extra_state(dotted):
                        continue
                    named = names.canonical(dotted)
                    if named is None:
                        raise ConvertError(f"{path}: tensor {'.'.join(map(str, keys))} is not a tensor of the LLaMA "
                                           "architecture (a bias, a learned position embedding, an expert, ...): this "
                                           "model cannot represent it")
                    if not isinstance(value, torch.Tensor):
                        raise ConvertError(f"{path}: {'.'.join(map(str, keys))} is a {type(value).__name__}, not a tensor")
                    stage.setdefault(named, []).append((t, path, keys, tuple(value.shape), value.dtype))
            del state
        self._parts = {}
        found = {}
        offset = 0
        for v in range(1 + max(v for v, _ in stages)):
            for p in range(pp):
                stage = stages.get((v, p), {})
                local = sorted({layer for layer, _ in stage if layer is not None})
                if local != list(range(len(local))):
                    raise ConvertError(f"{ckpt.directory}: pipeline rank {p}, virtual stage {v} holds layers "
                                       f"{local[:8]}; expected 0..n-1")
                for (layer, name), parts in stage.items():
                    where = f"{parts[0][1]}: {'.'.join(map(str, parts[0][2]))}"
                    if [t for t, *_ in parts] != list(range(tp)):
                        raise ConvertError(f"{where}: present in tensor-parallel ranks {[t for t, *_ in parts]} of {tp}")
                    key = (None if layer is None else offset + layer, name)
                    if key in found:
                        raise ConvertError(f"{where}: a second copy of {found[key][2]}")
                    found[key] = (self._global_shape(name, [s for *_, s, _ in parts], where), parts[0][4], where)
                    self._parts[key] = [(path, keys) for _, path, keys, _, _ in parts]
                offset += len(local)
        if offset != self.cfg.num_layers:
            raise ConvertError(f"{ckpt.directory}: the rank files hold {offset} layers, but args.num_layers is "
                               f"{self.cfg.num_layers}")
        self._index(found)

    @staticmethod
    def _global_shape(name: str, shapes: list[tuple], where: str) -> tuple:
        how = names.TP_SPLIT.get(name, "replicated")
        if how == "replicated" or len(shapes) == 1:
            if len(set(shapes)) != 1:
                raise ConvertError(f"{where}: tensor-parallel ranks hold shapes {shapes} of a replicated tensor")
            return shapes[0]
        dim = 1 if how == "columns" else 0
        rest = {s[:dim] + s[dim + 1:] for s in shapes}
        if len(rest) != 1:
            raise ConvertError(f"{where}: tensor-parallel ranks hold incompatible shapes {shapes}")
        shape = list(shapes[0])
        shape[dim] = sum(s[dim] for s in shapes)
        return tuple(shape)

    def _read(self, layer, name) -> torch.Tensor:
        parts = [self._files.get(path, keys) for path, keys in self._parts[(layer, name)]]
        if names.TP_SPLIT.get(name) == "replicated":
            for t, part in enumerate(parts[1:], 1):
                if not torch.equal(part, parts[0]):
                    raise ConvertError(f"{self._found[(layer, name)][2]}: tensor-parallel rank {t} holds other values "
                                       "than rank 0 for this replicated tensor (a corrupted rank file)")
        return merge_tp(name, parts)
