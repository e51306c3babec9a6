"""The torch_dist writer: megatron-core `dist_checkpointing`'s format, as megatron-core 0.16 saves it.

An iteration directory holds a PyTorch DCP checkpoint (`.metadata`, `__0_*.distcp`), `common.pt` (the
state that is not sharded: args, checkpoint_version, iteration, and the `content_metadata` that
Megatron-LM's `save_checkpoint` records) and `metadata.json` (the backends' names and versions).

The keys are layout-free (Megatron-LM reshards them at load to any TP/PP):
- `embedding.word_embeddings.weight`, `output_layer.weight` (the padded vocabulary),
  `decoder.final_layernorm.weight`;
- the layers stacked on a leading layer axis, `decoder.layers.<name>` (`names.dist_key`), stored as
  megatron-core stores them, one chunk per layer ([1, ...] at [layer, 0, ...]; fc1 as a gate chunk
  and an up chunk, its [gate; up] halves), so that one layer's tensor at a time is in memory;
- one byte item per layer and module whose `_extra_state` a model asks for,
  `decoder.layers.<module>._extra_state/shard_<layer>_<num_layers>` (megatron-core's ShardedObject
  key, shared by the TP ranks), and `decoder.final_layernorm._extra_state/shard_0_1` (megatron-core
  builds the final norm from Transformer Engine whenever it is installed, whatever the layer spec,
  and TE 2's RMSNorm has an extra state). Each holds `torch.save([None])`, megatron-core's packing
  of an empty extra state: None is what the local spec's layers and Transformer Engine (1.x and
  2.x) load as "no FP8 state". The items are those of the Transformer Engine spec, a superset of
  the local spec's: a model of either spec finds every key it asks for, and the keys it does not
  ask for are ignored by Megatron-LM's default strictness (`--dist-ckpt-strictness
  assume_ok_unexpected`).

DCP plans the whole checkpoint from the write items (shapes alone) and asks the planner for each
item's data when it writes it; each item goes to its own file, so DCP keeps none alive after it is
written.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, StorageMeta, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from ..convert import _progress, _unwrap
from .names import EMBEDDING, EXTRA_STATE_TE, FC1, FINAL_NORM, LAYER_TENSORS, OUTPUT, dist_key, ours

# what megatron-core 0.16's dist_checkpointing.save writes beside the DCP files
METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                 "common_backend_version": 1}
# what Megatron-LM's save_checkpoint records as content_metadata without a distributed optimizer
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
FINAL_NORM_EXTRA_STATE = "decoder.final_layernorm._extra_state/shard_0_1"


def extra_state_keys(num_layers: int) -> list[str]:
    """The `_extra_state` byte items a Transformer Engine spec model asks for (a superset of the local spec's)."""
    return [f"decoder.layers.{m}._extra_state/shard_{layer}_{num_layers}"
            for layer in range(num_layers) for m in EXTRA_STATE_TE] + [FINAL_NORM_EXTRA_STATE]


def empty_extra_state() -> io.BytesIO:
    buf = io.BytesIO()
    torch.save([None], buf)
    buf.seek(0)
    return buf


@dataclasses.dataclass
class _Chunk:
    """One stored chunk: canonical tensor (`layer`, `name`) whole, or fc1's gate or up half (`half`)."""

    key: str
    layer: int | None
    name: str
    global_size: tuple
    offsets: tuple
    sizes: tuple
    half: int | None = None


def plan_chunks(source) -> list[_Chunk]:
    """Every tensor chunk of the checkpoint, in the model's order: whole-model tensors in one chunk,
    layer tensors in one chunk per layer (fc1 in two, its gate rows then its up rows)."""
    num_layers = source.cfg.num_layers

    def whole(name):
        size = source.shape(None, name)
        return _Chunk(name, None, name, size, (0,) * len(size), size)

    chunks = [whole(EMBEDDING)]
    for layer in range(num_layers):
        for name in LAYER_TENSORS:
            shape = source.shape(layer, name)
            zeros = (0,) * (len(shape) - 1)
            if name == FC1:
                rows = shape[0] // 2
                chunks += [_Chunk(dist_key(name), layer, name, (num_layers,) + shape, (layer, half * rows) + zeros,
                                  (1, rows) + shape[1:], half) for half in (0, 1)]
            else:
                chunks.append(_Chunk(dist_key(name), layer, name, (num_layers,) + shape, (layer, 0) + zeros,
                                     (1,) + shape))
    return chunks + [whole(FINAL_NORM), whole(OUTPUT)]


class _StreamingSavePlanner(DefaultSavePlanner):
    """Plans DCP's save from `items` (no state dict) and resolves each item's data by `produce` when
    DCP writes it."""

    def __init__(self, items: list[WriteItem], produce):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._items, self._produce = items, produce

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        super().set_up_planner({}, storage_meta, is_coordinator)

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(list(self._items))
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        return self._produce(write_item)


class _Writer(dcp.FileSystemWriter):
    """DCP's file writer, one file per item, recording the checkpoint's final path as a str (as
    megatron-core's writer does; not the staging folder it is written in, and not a pathlib.Path,
    which a reader with an allow-list of the metadata's types refuses)."""

    def __init__(self, path: str, final_path: str):
        super().__init__(path, sync_files=True, single_file_per_rank=False)
        self._final_path = final_path

    def storage_meta(self) -> StorageMeta:
        return StorageMeta(checkpoint_id=self._final_path, save_id=self.save_id)


def write_torch_dist(source, iteration_dir: str, common: dict, progress: bool, final_dir: str) -> None:
    """Write our checkpoint (`source`, an export.OurTensors) as a torch_dist iteration directory
    (`iteration_dir`, renamed to `final_dir` once complete)."""
    chunks = {}
    items = []
    for c in plan_chunks(source):
        index = MetadataIndex(c.key, torch.Size(c.offsets))
        chunks[(c.key, tuple(c.offsets))] = c
        items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
            properties=TensorProperties(dtype=source.dtype), size=torch.Size(c.global_size))))
    extra = extra_state_keys(source.cfg.num_layers)
    items += [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in extra]
    total = sum(torch.Size(c.sizes).numel() for c in chunks.values()) * source.dtype.itemsize
    bar = _progress(total, "export", progress)

    def produce(item: WriteItem):
        if item.type == WriteItemType.BYTE_IO:
            return empty_extra_state()
        c = chunks[(item.index.fqn, tuple(item.index.offset))]
        # fc1's halves are our gate_proj and up_proj, read alone
        t = source.canonical(c.layer, c.name) if c.half is None else source.read(ours(c.layer, FC1)[c.half])
        if c.layer is not None:
            t = t.unsqueeze(0)
        bar.update(t.nbytes)
        return t.contiguous()

    try:
        dcp.save({}, storage_writer=_Writer(iteration_dir, final_dir), planner=_StreamingSavePlanner(items, produce),
                 no_dist=True)
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException only
        raise _unwrap(exc) from None
    finally:
        bar.close()
    torch.save(dict(common, content_metadata=dict(CONTENT_METADATA)), os.path.join(iteration_dir, "common.pt"))
    with open(os.path.join(iteration_dir, "metadata.json"), "w") as fh:
        json.dump(METADATA_JSON, fh)

