"""megatron-core's torch_dist checkpoints (PyTorch DCP underneath), read one layer's tensor at a time.

The keys carry no `model.` prefix; layer tensors are stacked on a leading layer axis
(`decoder.layers.self_attention.linear_qkv.weight` is [num_layers, ...]) unless the checkpoint was
saved with per-layer keys (`decoder.layers.3.…`, megatron-core's `singleton_local_shards`, which
also stores fc1's halves as `..._w` / `..._v`); whatever TP/PP/DP saved it, DCP's chunks describe
where each rank's share lies, so one layer is read by asking DCP for that slice of the global
tensor: memory holds one layer's tensor, never the stack (a 70B model's stacked fc1 is 75 GB).
Optimizer state, RNG state and the `_extra_state` byte items are not read: weights only.
"""

from __future__ import annotations

import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from ..convert import _unwrap
from ..reader import ShardReader
from ..sources import ConvertError
from . import names, pickles
from .source import MegatronSource

# top-level keys of a Megatron-LM torch_dist checkpoint that are not model weights
_NOT_WEIGHTS = ("optimizer.", "rng_state", "rerun_state_machine", "chained_")


class _SafeReader(ShardReader):
    """ShardReader whose `.metadata` is unpickled with the allow-list of `pickles.load_dcp_metadata`."""

    def read_metadata(self, *args, **kwargs):
        metadata = pickles.load_dcp_metadata(os.path.join(self.path, ".metadata"))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class _SlicePlanner(DefaultLoadPlanner):
    """Loads the box (offsets, target's shape) of stored tensor `fqn` into `target`."""

    def __init__(self, fqn: str, target: torch.Tensor, offsets: tuple):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._fqn, self._target, self._offsets = fqn, target, offsets

    def create_local_plan(self) -> LoadPlan:
        chunk = ChunkStorageMetadata(offsets=torch.Size(self._offsets), sizes=self._target.shape)
        return LoadPlan(create_read_items_for_chunk_list(self._fqn, self.metadata.state_dict_metadata[self._fqn],
                                                         [chunk]))

    def resolve_tensor(self, read_item) -> torch.Tensor:
        t = self._target
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            t = t.narrow(dim, offset, length)
        return t

    def commit_tensor(self, read_item, tensor) -> None:
        pass


class DistSource(MegatronSource):
    def __init__(self, directory: str, tokenizer_vocab: int | None = None):
        common = pickles.load(os.path.join(directory, "common.pt"))
        if not isinstance(common, dict) or "args" not in common:
            raise ConvertError(f"{os.path.join(directory, 'common.pt')}: holds no 'args' (not saved by Megatron-LM's "
                               "save_checkpoint); the model's configuration cannot be known")
        super().__init__(directory, common["args"], tokenizer_vocab, os.path.join(directory, "common.pt"))
        self.iteration = common.get("iteration")
        self._reader = _SafeReader(directory)
        metadata = self._reader.read_metadata()
        self._stacked: dict[tuple, bool] = {}
        self._keys: dict[tuple, str] = {}
        found = {}
        for key, md in metadata.state_dict_metadata.items():
            if key.startswith(_NOT_WEIGHTS) or names.is_extra_state(key) or not isinstance(md, TensorStorageMetadata):
                continue
            where = f"{directory}: tensor {key}"
            named = names.canonical(key)
            if named is None:
                raise ConvertError(f"{where}: not a tensor of the LLaMA architecture (a bias, a learned position "
                                   "embedding, an expert, ...): this model cannot represent it")
            layer, name = named
            shape = tuple(md.size)
            if layer is None and name not in (names.EMBEDDING, names.FINAL_NORM, names.OUTPUT):
                if shape[0] != self.cfg.num_layers:
                    raise ConvertError(f"{where}: stacks {shape[0]} layers, but args.num_layers is "
                                       f"{self.cfg.num_layers}")
                for i in range(shape[0]):
                    found[(i, name)] = (shape[1:], md.properties.dtype, f"{key}[{i}]")
                    self._keys[(i, name)], self._stacked[(i, name)] = key, True
                continue
            if (layer, name) in found:
                raise ConvertError(f"{where}: a second copy of {found[(layer, name)][2]}")
            found[(layer, name)] = (shape, md.properties.dtype, key)
            self._keys[(layer, name)], self._stacked[(layer, name)] = key, False
        self._index(found)

    def _read(self, layer, name) -> torch.Tensor:
        key = self._keys[(layer, name)]
        shape, dtype, where = self._found[(layer, name)]
        stacked = self._stacked[(layer, name)]
        target = torch.empty(((1,) if stacked else ()) + tuple(shape), dtype=dtype)
        offsets = ((layer,) if stacked else ()) + (0,) * len(shape)
        try:
            dcp.load({key: target}, storage_reader=self._reader, planner=_SlicePlanner(key, target, offsets),
                     no_dist=True)
        except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException only
            raise ConvertError(f"{self.dir}: cannot read {where} ({_unwrap(exc)})") from None
        return target[0] if stacked else target
