"""Streaming conversion between Hugging Face / Meta LLaMA checkpoints and ours (DCP).

Import: DCP plans the whole checkpoint from shapes alone (the state dict holds meta-device tensors)
and asks the planner for each tensor's data only when it writes it; our planner reads that tensor
from the source then, so one tensor at a time is in memory.
Export: each tensor is read alone from the DCP directory (DCP reshards whatever layout saved it),
and safetensors shards are written with their headers planned from DCP's metadata up front.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItemType
from tqdm import tqdm

from ..config import Config, ModelConfig
from ..model.llama import Llama
from .hf import hf_config_dict, model_config_from_hf, to_hf_name
from .manager import (PARTIAL_SUFFIX, TRAIN_STATE, checkpoint_dir, latest_iteration,
                      write_latest, write_train_state)
from .reader import ShardReader
from .sources import SAFETENSORS_DTYPES, ConvertError

warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Llama(cfg).state_dict().items()}


def _check_names(where: str, have: dict[str, tuple], want: dict[str, tuple]) -> None:
    unknown = sorted(set(have) - set(want))
    if unknown:
        raise ConvertError(f"{where}: unknown tensor {unknown[0]} (not a parameter of this LLaMA config)"
                           + (f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""))
    missing = sorted(set(want) - set(have), key=list(want).index)
    if missing:
        raise ConvertError(f"{where}: missing tensor {missing[0]}"
                           + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    for name, shape in want.items():
        if tuple(have[name]) != shape:
            raise ConvertError(f"{where}: tensor {name} has shape {list(have[name])} but the config implies "
                               f"{list(shape)}")


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                dynamic_ncols=True)


# -- import -----------------------------------------------------------------------------------------
class _StreamingPlanner(DefaultSavePlanner):
    """Hands DCP each tensor's data from `load(name)` at the moment DCP writes it."""

    def __init__(self, load):
        super().__init__()
        self._load = load

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        return self._load(write_item.index.fqn)


def import_checkpoint(source, save: str, dtype: str = "keep", progress: bool = True) -> str:
    """Write `source` (sources.HFSource / MetaSource) as iteration 0 of our checkpoint root `save`.

    `dtype` "keep" stores each tensor in its source dtype (bf16 for LLaMA2's releases): training
    loads it into fp32 master weights exactly (DCP copies into the destination's dtype), so an fp32
    copy would only double the bytes written and read at every start."""
    try:
        cfg = model_config_from_hf(source.hf_config)
    except (KeyError, ValueError) as exc:
        raise ConvertError(f"config: {exc.args[0] if isinstance(exc, ValueError) else f'missing {exc}'}") from None
    _check_names("source", source.shapes, expected_shapes(cfg))
    out_dtype = {name: DTYPES.get(dtype, source.dtypes[name]) for name in source.names}
    final = checkpoint_dir(save, 0)
    partial = final + PARTIAL_SUFFIX
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    bar = _progress(sum(torch.Size(source.shapes[n]).numel() * source.dtypes[n].itemsize for n in source.names),
                    "import", progress)

    def load(name: str) -> torch.Tensor:
        t = source.load(name)
        if tuple(t.shape) != source.shapes[name]:
            raise ConvertError(f"tensor {name} has shape {list(t.shape)}, expected {list(source.shapes[name])}")
        bar.update(t.nbytes)
        return t.to(out_dtype[name]).contiguous()

    state = {n: torch.empty(source.shapes[n], dtype=out_dtype[n], device="meta") for n in source.names}
    try:
        # one file per tensor: DCP keeps every tensor of a file alive until the file is complete
        dcp.save(state, storage_writer=dcp.FileSystemWriter(partial, sync_files=True, single_file_per_rank=False),
                 planner=_StreamingPlanner(load), no_dist=True)
    except Exception as exc:
        raise _unwrap(exc) from None
    finally:
        bar.close()
    write_train_state(partial, iteration=0, consumed_samples=0, config=Config(model=cfg))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(partial, final)
    write_latest(save, 0)
    return final


def _unwrap(exc: BaseException) -> BaseException:
    """DCP wraps the planner's exceptions (CheckpointException): the first one is the story."""
    failures = getattr(exc, "failures", None)
    if failures:
        first = failures[min(failures)]
        exc = first[0] if isinstance(first, tuple) else first
    return exc if isinstance(exc, ConvertError) else ConvertError(f"{type(exc).__name__}: {exc}")


# -- export -----------------------------------------------------------------------------------------
def find_checkpoint(load: str) -> str:
    """`load` is a checkpoint root (its `latest` decides) or one iteration directory."""
    if not os.path.isdir(load):
        raise ConvertError(f"--load {load}: no such directory")
    iteration = latest_iteration(load)
    ckpt = checkpoint_dir(load, iteration) if iteration is not None else load
    for f in (".metadata", TRAIN_STATE):
        if not os.path.isfile(os.path.join(ckpt, f)):
            raise ConvertError(f"{ckpt}: not a checkpoint (missing {f})")
    return ckpt


def _saved_model_config(ckpt: str) -> ModelConfig:
    with open(os.path.join(ckpt, TRAIN_STATE)) as fh:
        saved = json.load(fh)["config"]["model"]
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in saved.items() if k in names})


def _plan_shards(names: list[str], nbytes: dict[str, int], limit: int) -> list[list[str]]:
    shards, size = [[]], 0
    for name in names:
        if shards[-1] and size + nbytes[name] > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    return shards


def _safetensors_header(names: list[str], shapes: dict, dtype: dict) -> tuple[bytes, dict]:
    entries, offset = {}, 0
    for name in names:
        n = torch.Size(shapes[name]).numel() * dtype[name].itemsize
        entries[to_hf_name(name)] = dict(dtype=_SAFETENSORS_NAMES[dtype[name]], shape=list(shapes[name]),
                                         data_offsets=[offset, offset + n])
        offset += n
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as the safetensors writer does
    return struct.pack("<Q", len(header)) + header, entries


def export_checkpoint(load: str, hf_dir: str, max_shard_size: int = 5 * 10**9, dtype: str = "keep",
                      tokenizer_model: str | None = None, progress: bool = True) -> list[str]:
    """Our checkpoint -> a Hugging Face LLaMA folder; returns the files written."""
    ckpt = find_checkpoint(load)
    cfg = _saved_model_config(ckpt)
    reader = ShardReader(ckpt)  # refuses tensors its chunks do not cover (they would export garbage)
    meta = {k: v for k, v in reader.read_metadata().state_dict_metadata.items()
            if not k.startswith("optimizer") and isinstance(v, TensorStorageMetadata)}
    want = expected_shapes(cfg)
    _check_names(ckpt, {k: tuple(v.size) for k, v in meta.items()}, want)
    names = list(want)  # the model's order: embeddings, layers in order, norm, head
    # rows past the real vocabulary only pad the embedding for tensor parallelism
    shapes = {n: ((cfg.vocab_size,) + want[n][1:] if n in ("embed_tokens.weight", "lm_head.weight") else want[n])
              for n in names}
    out = {n: DTYPES.get(dtype, meta[n].properties.dtype) for n in names}
    nbytes = {n: torch.Size(shapes[n]).numel() * out[n].itemsize for n in names}
    shards = _plan_shards(names, nbytes, max_shard_size)
    os.makedirs(hf_dir, exist_ok=True)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, written = {}, []
    bar = _progress(sum(nbytes.values()), "export", progress)
    try:
        for file, shard in zip(files, shards):
            header, entries = _safetensors_header(shard, shapes, out)
            tmp = os.path.join(hf_dir, f".{file}.tmp")
            written.append(tmp)
            with open(tmp, "wb") as fh:
                fh.write(header)
                for name in shard:
                    t = torch.empty(tuple(meta[name].size), dtype=meta[name].properties.dtype)
                    dcp.load({name: t}, storage_reader=reader, no_dist=True)
                    t = t[:shapes[name][0]].to(out[name]).contiguous()
                    fh.write(memoryview(t.view(torch.uint8).numpy()))
                    bar.update(t.nbytes)
                    del t
                    weight_map[to_hf_name(name)] = file
                fh.flush()
                os.fsync(fh.fileno())
    except BaseException:
        for tmp in written:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    finally:
        bar.close()
    for file, tmp in zip(files, written):
        os.replace(tmp, os.path.join(hf_dir, file))
    torch_dtype = _DTYPE_NAMES[out["embed_tokens.weight"]]
    config = dict(hf_config_dict(cfg), vocab_size=cfg.vocab_size, torch_dtype=torch_dtype, bos_token_id=1,
                  eos_token_id=2)
    _write_json(os.path.join(hf_dir, "config.json"), config)
    _write_json(os.path.join(hf_dir, "generation_config.json"), dict(bos_token_id=1, eos_token_id=2))
    _write_json(os.path.join(hf_dir, "model.safetensors.index.json"),
                dict(metadata=dict(total_size=sum(nbytes.values())), weight_map=weight_map))
    names_out = files + ["config.json", "generation_config.json", "model.safetensors.index.json"]
    if tokenizer_model:
        names_out += write_tokenizer(tokenizer_model, hf_dir, cfg.max_position_embeddings)
    return names_out


def write_tokenizer(model_file: str, hf_dir: str, max_length: int) -> list[str]:
    """LLaMA2's SentencePiece model as a `LlamaTokenizer` folder."""
    if not os.path.isfile(model_file):
        raise ConvertError(f"--tokenizer-model {model_file}: no such file")
    shutil.copyfile(model_file, os.path.join(hf_dir, "tokenizer.model"))
    _write_json(os.path.join(hf_dir, "tokenizer_config.json"), dict(
        tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token=None,
        add_bos_token=True, add_eos_token=False, legacy=False, model_max_length=max_length,
        clean_up_tokenization_spaces=False))
    _write_json(os.path.join(hf_dir, "special_tokens_map.json"),
                dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"))
    return ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)
