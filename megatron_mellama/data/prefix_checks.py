"""A `--data-path` prefix checked against the run before megatron-core reads it: its files, its splits, its token ids.

Each check fails with one line naming the prefix, on every rank, where megatron-core would fail deep
down, loop forever, or train on ids beyond the model's vocabulary.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Optional

import numpy

from ..config import Config, ConfigError
from .index_file import DatasetError, read_index
from .indexed_writer import read_stats
from .tokenizer import Tokenizer, build_tokenizer

SPLIT_NAMES = ("train", "valid", "test")


def check_prefix(prefix: str, split_matrix: list, cfg: Config, splits=SPLIT_NAMES) -> None:
    """Fail with one line, on every rank, before megatron-core would fail deep down (or, for a split
    shorter than one sample, loop forever counting epochs).

    The .idx is parsed without megatron-core's reader (which asserts on a bad file): header, counts,
    and that the .bin holds exactly the bytes the index describes (sum of sequence lengths x token
    size, and the last sequence's offset + length), so a short .bin fails here instead of mid-run and
    a long one (misaligned data) does not train silently. Only the .idx is read, never the tokens."""
    for ext in (".idx", ".bin"):
        if not os.path.isfile(prefix + ext):
            raise ConfigError(f"--data-path {prefix}: {prefix}{ext} does not exist "
                              "(expected the .bin/.idx pair written by tools/preprocess_data.py)")
    try:
        index = read_index(prefix)
    except DatasetError as err:
        raise ConfigError(f"--data-path {prefix}: {err}") from None
    lengths = numpy.array(index.sequence_lengths)  # a copy: the mmap closes with `index`
    itemsize, dtype_name = numpy.dtype(index.dtype).itemsize, numpy.dtype(index.dtype).name
    last_end = (int(index.sequence_pointers[-1]) + int(lengths[-1]) * itemsize) if len(lengths) else 0
    del index
    if len(lengths) and int(lengths.min()) < 0:
        raise ConfigError(f"--data-path {prefix}: {prefix}.idx is corrupt (a negative sequence length)")
    tokens_total = int(lengths.sum(dtype=numpy.int64))
    expected = tokens_total * itemsize
    bin_bytes = os.path.getsize(prefix + ".bin")
    if bin_bytes != expected or last_end != expected:
        what = "truncated" if bin_bytes < expected else "longer than its index describes"
        raise ConfigError(
            f"--data-path {prefix}: {prefix}.bin holds {bin_bytes} bytes but {prefix}.idx describes "
            f"{tokens_total} tokens of {dtype_name} ({expected} bytes"
            + (f", last sequence ending at byte {last_end}" if last_end != expected else "")
            + f"): the .bin is {what if bin_bytes != expected else 'not what its index describes'}, "
            "or the pair comes from different runs; rerun tools/preprocess_data.py")
    need = cfg.data.seq_length + 1
    for name, bounds in zip(SPLIT_NAMES, split_matrix):
        if bounds is None or name not in splits:
            continue
        beg, end = (int(round(b * float(len(lengths)))) for b in bounds)
        tokens = int(lengths[beg:end].sum())
        if tokens < need:
            raise ConfigError(
                f"--data-path {prefix}: its {name} split (--split {cfg.data.split}) holds {end - beg} of "
                f"{len(lengths)} documents, {tokens} tokens, fewer than one sample of --seq-length "
                f"{cfg.data.seq_length} + 1; the {name} set is too small")


# The token-id check. Exact, without reading tokens, when `PREFIX.tokens.json` (written by
# preprocess_data.py beside the pair: smallest and largest id, sizes of both files) still matches
# the files' sizes. Otherwise (other tools' data, merged data) a .bin up to FULL_SCAN_BYTES is read
# whole, and a larger one in SAMPLE_WINDOWS windows of WINDOW_BYTES spread evenly over it (first and
# last included), about 64 MiB read whatever the size: a wrong tokenizer or vocabulary (ids beyond
# it everywhere) is caught in seconds, while a handful of stray ids in a 100 GB corpus may go unseen.
FULL_SCAN_BYTES = 256 << 20
SAMPLE_WINDOWS = 256
WINDOW_BYTES = 256 << 10


def max_token_id(prefix: str) -> tuple:
    """(smallest id, largest id, whether every token was seen) of `prefix.bin`, per the rule above."""
    stats = read_stats(prefix)
    if stats is not None:
        return stats[0], stats[1], True

    index = read_index(prefix)
    dtype = numpy.dtype(index.dtype)
    del index
    path = prefix + ".bin"
    n = os.path.getsize(path) // dtype.itemsize
    if n == 0:
        return None, None, True
    tokens = numpy.memmap(path, dtype=dtype, mode="r", shape=(n,))
    lo = hi = None
    if n * dtype.itemsize <= FULL_SCAN_BYTES:
        windows, complete = [(s, min(s + (16 << 20), n)) for s in range(0, n, 16 << 20)], True
    else:
        w = max(WINDOW_BYTES // dtype.itemsize, 1)
        starts = numpy.linspace(0, n - w, SAMPLE_WINDOWS).astype(numpy.int64)
        windows, complete = [(int(s), int(s) + w) for s in starts], False
    for beg, end in windows:
        chunk = tokens[beg:end]
        cmin, cmax = int(chunk.min()), int(chunk.max())
        lo = cmin if lo is None else min(lo, cmin)
        hi = cmax if hi is None else max(hi, cmax)
    del tokens
    return lo, hi, complete


def check_token_ids(prefix: str, vocab: int) -> None:
    """Every id must index the model's (padded) embedding: fail with one line naming the prefix.
    Checked as `max_token_id` says: every token of a .bin up to FULL_SCAN_BYTES, a spread-out sample
    of a larger one."""
    lo, hi, complete = max_token_id(prefix)
    if hi is None:
        return
    if hi >= vocab or lo < 0:
        bad = hi if hi >= vocab else lo
        seen = "" if complete else " (in a sample of its tokens)"
        raise ConfigError(
            f"--data-path {prefix}: token id {bad} in {prefix}.bin{seen} is outside the model's vocabulary "
            f"of {vocab} (padded) ids; was the data tokenized with another tokenizer than --tokenizer-model, "
            "or is --vocab-size too small?")


def tokenizer_and_vocab(cfg: Config, tokenizer: Optional[Tokenizer]) -> tuple:
    """The run's tokenizer (the one given, or --tokenizer-type/--tokenizer-model's) and the model's
    padded vocabulary (the tokenizer's, padded the same way, when --vocab-size is not set)."""
    d, m = cfg.data, cfg.model
    if tokenizer is None:
        if d.tokenizer_model is None:
            raise ConfigError(f"--tokenizer-type {d.tokenizer_type} needs --tokenizer-model")
        tokenizer = build_tokenizer(d.tokenizer_type, d.tokenizer_model)
    vocab = (m if m.vocab_size is not None else replace(m, vocab_size=tokenizer.vocab_size)).padded_vocab_size
    return tokenizer, vocab
