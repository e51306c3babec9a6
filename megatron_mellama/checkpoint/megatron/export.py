"""Our checkpoint -> a Megatron-LM checkpoint root, in either of Megatron-LM's formats.

`export_megatron` checks everything a user can get wrong before writing anything, then writes
`latest_checkpointed_iteration.txt` ("0") and `iter_0000000/` into a hidden sibling folder of
`--save`, renamed in at the end (a failure leaves `--save` as it was). Our tensors are read one at a
time (`OurTensors`), whatever parallel layout saved them; each writer holds at most one layer's
tensor (torch_dist) or one rank file's tensors (torch) in memory.

The weights only: no optimizer state and no RNG state (the saved args say so, `no_save_optim` and
`no_save_rng`, so Megatron-LM loads the model and starts its optimizer afresh, as `--finetune` does).
"""

from __future__ import annotations

import argparse
import os

import torch

from ...config import ModelConfig
from ..convert import DTYPES, StoredModel, _cast, _check_target, _saved_model_config, _Staged, find_checkpoint
from ..sources import ConvertError
from .args import args_from_model_config
from .layouts import fuse_qkv, padded_vocab
from .names import EMBEDDING, FC1, OUTPUT, QKV, ours
from .root import TRACKER

FORMATS = ("torch_dist", "torch")
TRANSFORMER_IMPLS = ("transformer_engine", "local")
ITERATION_DIR = "iter_0000000"
CHECKPOINT_VERSION = 3.0


class OurTensors(StoredModel):
    """Our checkpoint `ckpt`, read one tensor at a time, given as Megatron-LM's canonical tensors in
    `dtype` (DTYPES' names, or "keep": the checkpoint's dtype)."""

    def __init__(self, ckpt: str, dtype: str, padded_vocab_size: int | None = None):
        super().__init__(ckpt)
        self.dtype = DTYPES.get(dtype, self.meta[ours(None, EMBEDDING)[0]].properties.dtype)
        self.padded_vocab_size = padded_vocab_size or self.cfg.vocab_size

    def read(self, name: str) -> torch.Tensor:
        """Our tensor `name`, whole, in the export's dtype."""
        return _cast(super().read(name), self.dtype, name)

    def shape(self, layer: int | None, name: str) -> tuple[int, ...]:
        """The global shape of canonical tensor (`layer`, `name`) in Megatron-LM's layout."""
        shapes = [tuple(self.meta[n].size) for n in ours(layer, name)]
        if name in (EMBEDDING, OUTPUT):
            return (self.padded_vocab_size,) + shapes[0][1:]
        return (sum(s[0] for s in shapes),) + shapes[0][1:] if len(shapes) > 1 else shapes[0]

    def canonical(self, layer: int | None, name: str) -> torch.Tensor:
        """Canonical tensor (`layer`, `name`) whole: QKV fused per query group, fc1 as [gate; up], the
        embedding and output layer cut to the vocabulary and padded with zero rows to Megatron-LM's size."""
        parts = [self.read(n) for n in ours(layer, name)]
        if name == QKV:
            return fuse_qkv(*parts, self.cfg.num_attention_heads, self.cfg.kv_heads)
        if name == FC1:
            return torch.cat(parts, dim=0)
        if name in (EMBEDDING, OUTPUT):
            return self.padded_rows(parts[0])
        return parts[0]

    def padded_rows(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (our embedding or output layer, possibly padded to our own multiple) as the vocabulary's
        rows followed by zero rows up to Megatron-LM's padded size."""
        vocab, padded = self.cfg.vocab_size, self.padded_vocab_size
        if t.shape[0] >= padded:  # `t` is this export's own copy: zero its padding in place
            t = t[:padded]
            t[vocab:] = 0
            return t
        out = t.new_zeros((padded,) + tuple(t.shape[1:]))
        out[:vocab] = t[:vocab]
        return out


def check_parallel_sizes(cfg: ModelConfig, tp: int, pp: int, fmt: str) -> None:
    """Refuse sizes Megatron-LM cannot build this model with, naming the flag."""
    if tp < 1 or pp < 1:
        raise ConvertError(f"--tensor-model-parallel-size {tp} / --pipeline-model-parallel-size {pp}: "
                           "expected positive integers")
    for what, n in (("num_attention_heads", cfg.num_attention_heads), ("num_query_groups", cfg.kv_heads),
                    ("ffn_hidden_size", cfg.ffn_size)):
        if n % tp:
            raise ConvertError(f"--tensor-model-parallel-size {tp}: the model's {what} {n} is not divisible by it "
                               "(Megatron-LM splits it over the tensor-parallel ranks)")
    if fmt == "torch" and cfg.num_layers % pp:
        raise ConvertError(f"--pipeline-model-parallel-size {pp}: the model's {cfg.num_layers} layers do not split "
                           "evenly over the stages (the torch format's files hold L/P layers each)")


def megatron_args(cfg: ModelConfig, *, tp: int, pp: int, divisible_by: int, fmt: str, transformer_impl: str,
                  dtype: torch.dtype) -> argparse.Namespace:
    """The `args` the checkpoint carries: the architecture and the sizes it was written for, and that
    it holds weights only."""
    args = args_from_model_config(cfg, tp=tp, pp=pp, divisible_by=divisible_by, ckpt_format=fmt,
                                  transformer_impl=transformer_impl, dtype=dtype)
    args.no_save_optim = True
    args.no_save_rng = True
    return args


def export_megatron(load: str, save: str, tp: int, pp: int = 1, fmt: str = "torch_dist", divisible_by: int = 128,
                    transformer_impl: str = "transformer_engine", dtype: str = "keep", progress: bool = True,
                    overwrite: bool = False) -> list[str]:
    """Write our checkpoint `load` (a root or an iteration directory) as the Megatron-LM checkpoint
    root `save`, iteration 0; returns the files written, relative to `save`."""
    from . import export_dist, export_torch

    if fmt not in FORMATS:
        raise ConvertError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ConvertError(f"--transformer-impl {transformer_impl}: expected one of {', '.join(TRANSFORMER_IMPLS)}")
    if divisible_by < 1:
        raise ConvertError(f"--make-vocab-size-divisible-by {divisible_by}: expected a positive integer")
    if dtype != "keep" and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype}: expected keep or one of {', '.join(DTYPES)}")
    ckpt = find_checkpoint(load)
    _check_target(save, "--save", overwrite, ckpt)
    cfg = _saved_model_config(ckpt)
    check_parallel_sizes(cfg, tp, pp, fmt)
    source = OurTensors(ckpt, dtype, padded_vocab(cfg.vocab_size, divisible_by, tp))
    args = megatron_args(cfg, tp=tp, pp=pp, divisible_by=divisible_by, fmt=fmt, transformer_impl=transformer_impl,
                         dtype=source.dtype)
    with _Staged(save) as staged:
        iteration_dir = os.path.join(staged.dir, ITERATION_DIR)
        os.makedirs(iteration_dir)
        common = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0}
        if fmt == "torch_dist":
            export_dist.write_torch_dist(source, iteration_dir, common, progress,
                                         os.path.join(os.path.abspath(save), ITERATION_DIR))
        else:
            export_torch.write_torch(source, iteration_dir, common, tp, pp, transformer_impl, progress)
        _write_text(os.path.join(staged.dir, TRACKER), "0")
        written = sorted(os.path.relpath(os.path.join(d, f), staged.dir)
                         for d, _, files in os.walk(staged.dir) for f in files)
        staged.commit()
    return written


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())

