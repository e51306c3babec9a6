"""Megatron-LM checkpoint (torch_dist or torch format) -> iteration 0 of a checkpoint of ours.

The configuration comes from the checkpoint's own saved args; the weights stream through
`convert.import_checkpoint` one tensor at a time (atomic output, checksums). Weights only: the
optimizer state is not carried over (`pretrain --load OURS --finetune` starts a fresh one).
"""

from __future__ import annotations

import os

from ..sources import ConvertError
from . import pickles, root


def saved_args(ckpt: root.MegatronCheckpoint):
    """The args Megatron-LM saved with checkpoint `ckpt` (first model-parallel rank's, for the torch format)."""
    path = os.path.join(ckpt.directory, "common.pt") if ckpt.format == "torch_dist" else ckpt.rank_files[(0, 0)]
    state = pickles.load(path, mmap=ckpt.format == "torch")
    if not isinstance(state, dict) or "args" not in state:
        raise ConvertError(f"{path}: holds no 'args' (not saved by Megatron-LM's save_checkpoint); the model's "
                           "configuration cannot be known")
    return state["args"]


def tokenizer_vocab_size(path: str) -> int:
    import sentencepiece

    try:
        return sentencepiece.SentencePieceProcessor(model_file=path).vocab_size()
    except (OSError, RuntimeError) as exc:
        raise ConvertError(f"--tokenizer-model {path}: not a SentencePiece model ({exc})") from None


def open_source(load: str, iteration: int | None = None, tokenizer_model: str | None = None, say=print):
    """The MegatronSource of root `load`; without `tokenizer_model`, the args' own tokenizer path when it
    exists on this machine (announced through `say`), else every padded vocabulary row is kept."""
    from .dist_source import DistSource
    from .torch_source import TorchSource

    ckpt = root.find(load, iteration)
    if tokenizer_model is None:
        named = getattr(saved_args(ckpt), "tokenizer_model", None)
        if isinstance(named, str) and os.path.isfile(named):
            say(f"tokenizer: {named} (the checkpoint's args.tokenizer_model)")
            tokenizer_model = named
    vocab = tokenizer_vocab_size(tokenizer_model) if tokenizer_model else None
    source = DistSource(ckpt.directory, vocab) if ckpt.format == "torch_dist" else TorchSource(ckpt, vocab)
    source.format = ckpt.format
    return source


def import_megatron(load: str, save: str, *, iteration: int | None = None, tokenizer_model: str | None = None,
                    dtype: str = "keep", progress: bool = True, overwrite: bool = False, say=print) -> str:
    """Import Megatron-LM root `load` into our root `save`; returns the iteration folder written."""
    from ..convert import import_checkpoint

    source = open_source(load, iteration, tokenizer_model, say)
    padded = source.args.padded_vocab_size
    if source.vocab_size < padded:
        say(f"vocabulary: {source.vocab_size} rows kept, {padded - source.vocab_size} rows of Megatron-LM's padding "
            "dropped")
    elif tokenizer_model is None:
        say(f"vocabulary: all {padded} rows kept, Megatron-LM's padding included (give --tokenizer-model to drop "
            "the rows beyond the tokenizer)")
    provenance = dict(framework="Megatron-LM", format=source.format, directory=os.path.abspath(source.dir),
                      iteration=source.iteration)
    return import_checkpoint(source, save, dtype, progress=progress, overwrite=overwrite, provenance=provenance)
