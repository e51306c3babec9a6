"""Read a Hugging Face or Meta LLaMA checkpoint one tensor at a time, under our parameter names.

A source never holds the model: safetensors are read tensor by tensor; `.bin`/`.pth` files are
memory-mapped, and the mappings are dropped after a bounded number of bytes were read through them,
so the pages they pulled in stop counting as this process's memory.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import struct

import torch

from ..errors import MellamaError
from ..models import model_spec

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
# buffers older Hugging Face checkpoints saved; recomputed by every model
_HF_SKIPPED = ("rotary_emb.inv_freq",)
_REMAP_BYTES = 1 << 30
# params.json fields of Meta's releases that `hf_config_from_params` reads, or that do not change the
# function (max_batch_size sizes Meta's KV cache); any other is refused, and use_scaled_rope must be false
_META_PARAMS = frozenset({"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                          "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len", "max_batch_size",
                          "use_scaled_rope"})


class ConvertError(MellamaError, ValueError):
    """The input cannot be converted; the message names the file or tensor and what is wrong."""


def _read_json(path: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ConvertError(f"{path}: no such file") from None
    except ValueError as exc:
        raise ConvertError(f"{path}: not valid JSON ({exc})") from None


def _mmap_load(path: str) -> dict:
    try:
        return torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise ConvertError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None


class MappedFiles:
    """torch.load(mmap=True) of `.bin`/`.pth` files, forgotten after `_REMAP_BYTES` were read through them.

    `load(path)` maps a file (default: a weights-only torch.load); `get(path, name)` copies out one
    tensor, `name` a key of the file's dict or a tuple of keys into nested dicts."""

    def __init__(self, load=None, remap_bytes: int = _REMAP_BYTES):
        self._load = load or _mmap_load
        self._remap_bytes = remap_bytes
        self._open: dict[str, dict] = {}
        self._read = 0

    def get(self, path: str, name) -> torch.Tensor:
        if path not in self._open:
            self._open[path] = self._load(path)
        found = self._open[path]
        for key in name if isinstance(name, tuple) else (name,):
            if not isinstance(found, dict) or key not in found:
                raise ConvertError(f"{path}: has no tensor {'.'.join(map(str, name)) if isinstance(name, tuple) else name}")
            found = found[key]
        tensor = found.clone()  # a private copy: the mapping may be dropped next
        self._read += tensor.nbytes
        if self._read > self._remap_bytes:
            self._open.clear()
            self._read = 0
        return tensor


@functools.lru_cache(maxsize=64)
def _safetensors_index(path: str) -> dict:
    """hf name -> (shape, dtype, (first byte, end byte) in the file), from the file's JSON header."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            (n,) = struct.unpack("<Q", fh.read(8))
            if 8 + n > size:
                raise ValueError(f"its header claims {n} bytes, the file has {size}")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        index = {k: (tuple(v["shape"]), SAFETENSORS_DTYPES.get(v["dtype"]),
                     (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])) for k, v in header.items()}
    except (OSError, ValueError, struct.error, KeyError, TypeError, AttributeError) as exc:
        raise ConvertError(f"{path}: not a safetensors file, or a truncated one ({type(exc).__name__}: {exc})") from None
    end = max((stop for _, _, (_, stop) in index.values()), default=8 + n)
    if end > size:
        raise ConvertError(f"{path}: truncated file ({size} bytes; its header describes {end})")
    return index


class HFSource:
    """A Hugging Face LLaMA folder: config.json and safetensors or pytorch_model*.bin files (index optional)."""

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        self.hf_config = _read_json(os.path.join(hf_dir, "config.json"))
        self._mapped = MappedFiles()
        self._where: dict[str, tuple[str, str]] = {}  # our name -> (file, hf name)
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for path in self._files():
            if path.endswith(".safetensors"):
                for hf_name, (shape, dtype, _) in _safetensors_index(path).items():
                    self._add(path, hf_name, shape, dtype)
            else:
                # shapes only: the mapping reads no tensor data
                for hf_name, t in _mmap_load(path).items():
                    self._add(path, hf_name, tuple(t.shape), t.dtype)
        self.names = list(self._where)  # file order: each file's tensors are read together

    def source_name(self, name: str) -> str:
        """`name` as the source's files call it."""
        return self._where[name][1]

    def _files(self) -> list[str]:
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            path = os.path.join(self.dir, index)
            if os.path.isfile(path):
                files = sorted(set(_read_json(path).get("weight_map", {}).values()))
                for f in files:
                    if not os.path.isfile(os.path.join(self.dir, f)):
                        raise ConvertError(f"{os.path.join(self.dir, f)}: shard named in {index} does not exist")
                return [os.path.join(self.dir, f) for f in files]
        files = sorted(glob.glob(os.path.join(self.dir, "*.safetensors"))) or sorted(
            glob.glob(os.path.join(self.dir, "pytorch_model*.bin")))
        if not files:
            raise ConvertError(f"{self.dir}: no *.safetensors or pytorch_model*.bin files")
        return files

    def _add(self, path: str, hf_name: str, shape: tuple, dtype) -> None:
        if hf_name.endswith(_HF_SKIPPED):
            return
        try:
            name = model_spec().hf.from_hf_name(hf_name)
        except KeyError as exc:
            raise ConvertError(f"{path}: {exc.args[0]}") from None
        if dtype is None or not dtype.is_floating_point:
            raise ConvertError(f"{path}: tensor {hf_name} has dtype {dtype}, not a floating-point type")
        self._where[name] = (path, hf_name)
        self.shapes[name], self.dtypes[name] = shape, dtype

    def load(self, name: str) -> torch.Tensor:
        path, hf_name = self._where[name]
        if path.endswith(".safetensors"):
            # read into our own buffer: a tensor over safetensors' mapping keeps the pages it touched
            # resident (and counted) for as long as the mapping lives
            shape, dtype, (start, end) = _safetensors_index(path)[hf_name]
            t = torch.empty(shape, dtype=dtype)
            with open(path, "rb") as fh:
                fh.seek(start)
                if fh.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != end - start:
                    raise ConvertError(f"{path}: truncated file (tensor {hf_name})")
            return t
        return self._mapped.get(path, hf_name)


class MetaSource:
    """Meta's release folder: params.json and consolidated.NN.pth model-parallel shards."""

    def __init__(self, meta_dir: str):
        self.dir = meta_dir
        params = _read_json(os.path.join(meta_dir, "params.json"))
        unknown = sorted(set(params) - _META_PARAMS)
        if unknown:
            raise ConvertError(f"{os.path.join(meta_dir, 'params.json')}: unknown field {unknown[0]}="
                               f"{params[unknown[0]]!r}; it may change what the model computes, and this LLaMA2 "
                               "converter cannot represent it")
        if params.get("use_scaled_rope"):
            raise ConvertError(f"{os.path.join(meta_dir, 'params.json')}: use_scaled_rope is "
                               f"{params['use_scaled_rope']!r}; supported: false (plain RoPE, no scaling)")
        self.shards = sorted(glob.glob(os.path.join(meta_dir, "consolidated.*.pth")))
        if not self.shards:
            raise ConvertError(f"{meta_dir}: no consolidated.*.pth files")
        self._mapped = MappedFiles()
        first = _mmap_load(self.shards[0])
        self._meta_names: dict[str, tuple[str, int | None]] = {}
        self.shapes, self.dtypes = {}, {}
        for meta_name, t in first.items():
            if meta_name in model_spec().meta.skipped:
                continue
            try:
                name, dim = model_spec().meta.to_ours(meta_name)
            except KeyError as exc:
                raise ConvertError(f"{self.shards[0]}: {exc.args[0]}") from None
            shape = list(t.shape)
            if dim is not None:
                shape[dim] *= len(self.shards)
            self._meta_names[name] = (meta_name, dim)
            self.shapes[name], self.dtypes[name] = tuple(shape), t.dtype
        vocab = self.shapes["embed_tokens.weight"][0]
        self.hf_config = model_spec().meta.hf_config_from_params(params, vocab)
        self.names = list(self._meta_names)

    def source_name(self, name: str) -> str:
        return self._meta_names[name][0]

    def load(self, name: str) -> torch.Tensor:
        meta_name, dim = self._meta_names[name]
        parts = [self._mapped.get(path, meta_name) for path in (self.shards if dim is not None else self.shards[:1])]
        w = torch.cat(parts, dim=dim) if dim is not None else parts[0]
        c = self.hf_config
        if name.endswith("q_proj.weight"):
            w = model_spec().meta.interleaved_to_half(w, c["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = model_spec().meta.interleaved_to_half(w, c["num_key_value_heads"])
        return w
