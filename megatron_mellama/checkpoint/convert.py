"""Streaming conversion between Hugging Face / Meta LLaMA checkpoints and ours (DCP).

Import: DCP plans the whole checkpoint from shapes alone (the state dict holds meta-device tensors)
and asks the planner for each tensor's data only when it writes it; our planner reads that tensor
from the source then, so one tensor at a time is in memory.
Export: each tensor is read alone from the DCP directory (DCP reshards whatever layout saved it),
and safetensors shards are written with their headers planned from DCP's metadata up front.

Both own their output folder: a non-empty `--save` / `--hf-dir` is refused unless `overwrite`, and
then replaced whole. Everything is written into a hidden sibling folder first, which is renamed in
at the end (the old folder renamed aside first, removed last): a failure leaves the target as it
was, never half-written. A cast to a narrower dtype (`--dtype fp16`) refuses a tensor whose values
lie beyond the new dtype's range rather than writing them as inf.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
import uuid
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItemType
from tqdm import tqdm

from ..config import Config, ModelConfig
from ..models import model_spec
from . import checksums
from .layout import TRAIN_STATE, checkpoint_dir, latest_iteration, write_latest, write_train_state
from .trained_tokenizer import check_tokenizer_file
from .reader import ShardReader
from .sources import SAFETENSORS_DTYPES, ConvertError

warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model_spec().meta_model(cfg).state_dict().items()}


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


def _cast(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """`t.to(dtype)`, refusing finite values the narrower dtype would turn into inf (fp16: |x| > 65504)."""
    if dtype != t.dtype and t.numel() and torch.finfo(dtype).max < torch.finfo(t.dtype).max:
        big = t.abs().max().item()
        if math.isfinite(big) and big > torch.finfo(dtype).max:
            raise ConvertError(f"tensor {name}: largest magnitude {big:.6g} is beyond {_DTYPE_NAMES[dtype]}'s "
                               f"range ({torch.finfo(dtype).max:.6g}) and would become inf; use --dtype bf16, "
                               "fp32 or keep")
    return t.to(dtype)


def _overlaps(inside: str, folder: str) -> bool:
    a, b = os.path.realpath(inside), os.path.realpath(folder)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def _check_target(path: str, flag: str, overwrite: bool, source: str) -> None:
    """Refuse an output folder that holds anything, unless `overwrite` (and never the input's folder)."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ConvertError(f"{flag} {path}: exists and is not a directory")
    if source and _overlaps(source, path):
        raise ConvertError(f"{flag} {path}: holds the input {source}; write somewhere else")
    entries = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if not entries or overwrite:
        return
    iteration = latest_iteration(path) if os.path.isfile(os.path.join(path, "latest")) else None
    iters = [e for e in entries if e.startswith("iter_")]
    what = (f"holds checkpoints (latest {iteration}, {len(iters)} iter_* folders)" if iteration is not None or iters
            else f"not empty ({len(entries)} entries: {', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''})")
    raise ConvertError(f"{flag} {path}: {what}; pass --overwrite to replace it whole")


class _Staged:
    """A hidden sibling folder of `final` to write into; `commit()` swaps it in by rename, else it is removed."""

    def __init__(self, final: str):
        self.final = os.path.abspath(final)
        parent, base = os.path.split(self.final)
        self._name = os.path.join(parent, f".{base}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.dir = self._name + ".partial"
        try:
            os.makedirs(parent, exist_ok=True)
            os.mkdir(self.dir)
        except OSError as exc:
            raise ConvertError(f"{final}: cannot write beside it in {parent} ({exc.strerror or exc})") from None

    def __enter__(self) -> "_Staged":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if os.path.isdir(self.dir):  # not committed: an error, or an interrupt
            shutil.rmtree(self.dir, ignore_errors=True)

    def commit(self) -> None:
        old = None
        if os.path.lexists(self.final):
            old = self._name + ".old"
            os.rename(self.final, old)
        try:
            os.rename(self.dir, self.final)
        except BaseException:
            if old is not None:
                os.rename(old, self.final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(os.path.dirname(self.final))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def import_checkpoint(source, save: str, dtype: str = "keep", progress: bool = True, overwrite: bool = False,
                      provenance: dict | None = None) -> str:
    """Write `source` (sources.HFSource / MetaSource, megatron.source.MegatronSource) as iteration 0 of
    our checkpoint root `save`; `provenance` (where the weights came from) goes into train_state.json.

    `save` must be empty or absent unless `overwrite`; it is then replaced whole (see the module doc).

    `dtype` "keep" stores each tensor in its source dtype (bf16 for LLaMA2's releases): training
    loads it into fp32 master weights exactly (DCP copies into the destination's dtype), so an fp32
    copy would only double the bytes written and read at every start."""
    try:
        cfg = model_spec().hf.config_from_hf(source.hf_config)
    except (KeyError, ValueError) as exc:
        raise ConvertError(f"config: {exc.args[0] if isinstance(exc, ValueError) else f'missing {exc}'}") from None
    _check_names("source", source.shapes, expected_shapes(cfg))
    _check_target(save, "--save", overwrite, getattr(source, "dir", ""))
    out_dtype = {name: DTYPES.get(dtype, source.dtypes[name]) for name in source.names}
    with _Staged(save) as staged:
        _import_into(source, staged.dir, cfg, out_dtype, progress, provenance)
        staged.commit()
    return checkpoint_dir(save, 0)


def _import_into(source, root: str, cfg: ModelConfig, out_dtype: dict, progress: bool, provenance: dict | None) -> None:
    ckpt = checkpoint_dir(root, 0)
    os.makedirs(ckpt)
    bar = _progress(sum(torch.Size(source.shapes[n]).numel() * source.dtypes[n].itemsize for n in source.names),
                    "import", progress)

    def load(name: str) -> torch.Tensor:
        t = source.load(name)
        if tuple(t.shape) != source.shapes[name]:
            raise ConvertError(f"tensor {name} has shape {list(t.shape)}, expected {list(source.shapes[name])}")
        bar.update(t.nbytes)
        return _cast(t, out_dtype[name], label(name)).contiguous()

    label = getattr(source, "source_name", str)  # the tensor's name in the source's files
    state = {n: torch.empty(source.shapes[n], dtype=out_dtype[n], device="meta") for n in source.names}
    try:
        # one file per tensor: DCP keeps every tensor of a file alive until the file is complete
        dcp.save(state, storage_writer=dcp.FileSystemWriter(ckpt, sync_files=True, single_file_per_rank=False),
                 planner=_StreamingPlanner(load), no_dist=True)
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException only
        raise _unwrap(exc) from None
    finally:
        bar.close()
    write_train_state(ckpt, iteration=0, consumed_samples=0, config=Config(model=cfg),
                      extra=dict(imported_from=provenance) if provenance else None)
    # as a training save does: checksums of every file, before `latest` names the checkpoint
    checksums.write_checksums(ckpt, checksums.checksum_files(ckpt, checksums.files_under(ckpt)))
    write_latest(root, 0)


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


class StoredModel:
    """Our checkpoint `ckpt`'s model tensors (its config, each tensor's stored metadata, checked against
    the shapes the config implies), read one whole tensor at a time whatever layout saved them."""

    def __init__(self, ckpt: str):
        self.ckpt = ckpt
        self.cfg = _saved_model_config(ckpt)
        self.reader = ShardReader(ckpt)  # refuses tensors its chunks do not cover (they would export garbage)
        self.meta = {k: v for k, v in self.reader.read_metadata().state_dict_metadata.items()
                     if not k.startswith("optimizer") and isinstance(v, TensorStorageMetadata)}
        self.shapes = expected_shapes(self.cfg)
        _check_names(ckpt, {k: tuple(v.size) for k, v in self.meta.items()}, self.shapes)

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` whole, in its stored dtype."""
        t = torch.empty(tuple(self.meta[name].size), dtype=self.meta[name].properties.dtype)
        try:
            dcp.load({name: t}, storage_reader=self.reader, no_dist=True)
        except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException only
            raise ConvertError(f"{self.ckpt}: cannot read {name} ({_unwrap(exc)})") from None
        return t


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
        entries[model_spec().hf.to_hf_name(name)] = dict(dtype=_SAFETENSORS_NAMES[dtype[name]], shape=list(shapes[name]),
                                         data_offsets=[offset, offset + n])
        offset += n
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as the safetensors writer does
    return struct.pack("<Q", len(header)) + header, entries


def export_checkpoint(load: str, hf_dir: str, max_shard_size: int = 5 * 10**9, dtype: str = "keep",
                      tokenizer_model: str | None = None, progress: bool = True, overwrite: bool = False,
                      chat_template: str | None = None) -> list[str]:
    """Our checkpoint -> a Hugging Face LLaMA folder; returns the files written.

    `hf_dir` must be empty or absent unless `overwrite`; it is then replaced whole (see the module doc).
    `chat_template` (Jinja source) goes into the tokenizer's `tokenizer_config.json`."""
    ckpt = find_checkpoint(load)
    _check_target(hf_dir, "--hf-dir", overwrite, ckpt)
    if tokenizer_model:
        check_tokenizer_file(tokenizer_model)
    if chat_template is not None and not tokenizer_model:
        raise ConvertError(f"{ckpt}: a chat template is exported with the tokenizer: give --tokenizer-model "
                           "(or --chat-template none)")
    model = StoredModel(ckpt)
    cfg, meta, want = model.cfg, model.meta, model.shapes
    names = list(want)  # the model's order: embeddings, layers in order, norm, head
    # rows past the real vocabulary only pad the embedding for tensor parallelism
    shapes = {n: ((cfg.vocab_size,) + want[n][1:] if n in ("embed_tokens.weight", "lm_head.weight") else want[n])
              for n in names}
    out = {n: DTYPES.get(dtype, meta[n].properties.dtype) for n in names}
    nbytes = {n: torch.Size(shapes[n]).numel() * out[n].itemsize for n in names}
    shards = _plan_shards(names, nbytes, max_shard_size)
    with _Staged(hf_dir) as staged:
        written = _export_into(staged.dir, model, cfg, names, shapes, out, nbytes, shards, tokenizer_model, progress,
                               chat_template)
        staged.commit()
    return written


def _export_into(hf_dir, model, cfg, names, shapes, out, nbytes, shards, tokenizer_model, progress, chat_template):
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    bar = _progress(sum(nbytes.values()), "export", progress)
    try:
        for file, shard in zip(files, shards):
            header, entries = _safetensors_header(shard, shapes, out)
            with open(os.path.join(hf_dir, file), "wb") as fh:
                fh.write(header)
                for name in shard:
                    t = model.read(name)
                    t = _cast(t[:shapes[name][0]], out[name], model_spec().hf.to_hf_name(name)).contiguous()
                    fh.write(memoryview(t.view(torch.uint8).numpy()))
                    bar.update(t.nbytes)
                    del t
                    weight_map[model_spec().hf.to_hf_name(name)] = file
                fh.flush()
                os.fsync(fh.fileno())
    finally:
        bar.close()
    torch_dtype = _DTYPE_NAMES[out["embed_tokens.weight"]]
    config = dict(model_spec().hf.config_to_hf(cfg), vocab_size=cfg.vocab_size, torch_dtype=torch_dtype, bos_token_id=1,
                  eos_token_id=2)
    _write_json(os.path.join(hf_dir, "config.json"), config)
    _write_json(os.path.join(hf_dir, "generation_config.json"), dict(bos_token_id=1, eos_token_id=2))
    _write_json(os.path.join(hf_dir, "model.safetensors.index.json"),
                dict(metadata=dict(total_size=sum(nbytes.values())), weight_map=weight_map))
    names_out = files + ["config.json", "generation_config.json", "model.safetensors.index.json"]
    if tokenizer_model:
        names_out += write_tokenizer(tokenizer_model, hf_dir, cfg.max_position_embeddings, chat_template)
    return names_out


def saved_chat_template(ckpt: str) -> str | None:
    """The chat template an instruction-tuning run recorded in checkpoint `ckpt` (None for pretraining)."""
    with open(os.path.join(ckpt, TRAIN_STATE)) as fh:
        return json.load(fh).get("extra", {}).get("chat_template")


def write_tokenizer(model_file: str, hf_dir: str, max_length: int, chat_template: str | None = None) -> list[str]:
    """LLaMA2's SentencePiece model as a `LlamaTokenizer` folder.

    `legacy=True` is the original LLaMA-2 tokenizer's behaviour, and the one our tokenizer and
    tools/preprocess_sft.py encode with: text after a special token in a string (the `<s>[INST]` of
    a chat template) gets SentencePiece's leading space, so `apply_chat_template` gives the ids the
    model was trained on."""
    if not os.path.isfile(model_file):
        raise ConvertError(f"--tokenizer-model {model_file}: no such file")
    shutil.copyfile(model_file, os.path.join(hf_dir, "tokenizer.model"))
    config = dict(tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                  pad_token=None, add_bos_token=True, add_eos_token=False, legacy=True,
                  model_max_length=max_length, clean_up_tokenization_spaces=False)
    if chat_template is not None:
        config["chat_template"] = chat_template
    _write_json(os.path.join(hf_dir, "tokenizer_config.json"), config)
    _write_json(os.path.join(hf_dir, "special_tokens_map.json"),
                dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"))
    return ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)
