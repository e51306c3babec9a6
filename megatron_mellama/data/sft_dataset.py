"""`--sft`: instruction-tuning samples from the token and loss-mask pairs of tools/preprocess_sft.py.

`--data-path P` names the prefix the tool was given: P_text_document.{bin,idx} holds one rendered
conversation per document, P_loss_mask_document.{bin,idx} a uint8 per token (1 = trained). A
split takes the same range of documents as megatron-core gives a pretraining prefix (`--split`).

A sample packs whole conversations of its split, in an order shuffled by `--seed`, greedily into
`--seq-length` + 1 tokens; a conversation never continues into the next sample (one longer than
that is cut to it, and counted at build: one line per prefix says how many were cut and how many of
those lost every answer token) and the rest is padding (the EOD id, no loss). Positions restart at 0 at each
conversation, so with --reset-attention-mask (implied by --sft) a token attends only within its
conversation, and the padding forms a last document of its own. `tokens`, `labels` and `loss_mask`
are as in GPTDataset: the mask is the one of the label token, so a conversation's last token, whose
label is the next conversation's BOS (mask 0), trains nothing.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import numpy
import torch

from ..config import ConfigError
from .index_file import read_index
from .prefix_checks import check_prefix

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron.core's package import warns about optional kernels
    from megatron.core.datasets.indexed_dataset import IndexedDataset

TOKENS_SUFFIX = "_text_document"
MASK_SUFFIX = "_loss_mask_document"


def pair_of(prefix: str) -> tuple:
    """The token and loss-mask prefixes of an SFT prefix."""
    return prefix + TOKENS_SUFFIX, prefix + MASK_SUFFIX


def check_pair(prefix: str, cfg) -> numpy.ndarray:
    """Fail with one line unless both pairs exist, hold the bytes their indexes describe, and
    describe the same conversations; returns the conversation lengths."""
    lengths = []
    for path in pair_of(prefix):
        for ext in (".idx", ".bin"):
            if not os.path.isfile(path + ext):
                raise ConfigError(f"--data-path {prefix} (--sft): {path}{ext} does not exist "
                                  "(expected the pairs written by tools/preprocess_sft.py)")
        # no split is checked for size: a short split is padded, not refused
        check_prefix(path, [], cfg, ())
        index = read_index(path)
        lengths.append(numpy.array(index.sequence_lengths, dtype=numpy.int64))
        del index
    tokens, masks = lengths
    if len(tokens) != len(masks) or not numpy.array_equal(tokens, masks):
        what = (f"{len(tokens)} vs {len(masks)} documents" if len(tokens) != len(masks)
                else "documents of other lengths")
        raise ConfigError(f"--data-path {prefix} (--sft): {pair_of(prefix)[1]} does not match "
                          f"{pair_of(prefix)[0]} ({what}); rerun tools/preprocess_sft.py")
    return tokens


def split_range(num_documents: int, bounds) -> tuple:
    """The documents [begin, end) of a split, rounded as megatron-core rounds them."""
    beg, end = (int(round(b * float(num_documents))) for b in bounds)
    return beg, end


def pack_greedily(lengths: numpy.ndarray, capacity: int) -> numpy.ndarray:
    """Start (in `lengths`' order) of each sample when whole items fill samples of `capacity` in turn;
    an item longer than `capacity` must be clipped first. One entry more: the end."""
    starts, used = [0], 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > capacity:
            starts.append(i)
            used = 0
        used += n
    starts.append(len(lengths))
    return numpy.asarray(starts, dtype=numpy.int64)


class SFTDataset(torch.utils.data.Dataset):
    """One split of one SFT prefix as packed samples; see the module docstring.

    `num_samples`: the length to present (validation reads a fixed number of samples), cycling over
    the split's packed samples; default one epoch of them."""

    def __init__(self, prefix: str, bounds, seq_length: int, seed: int, eod: int,
                 num_samples: Optional[int] = None):
        self.prefix, self.capacity, self.eod = prefix, int(seq_length) + 1, int(eod)
        tokens_path, mask_path = pair_of(prefix)
        self.tokens = IndexedDataset(tokens_path)
        self.masks = IndexedDataset(mask_path)
        beg, end = split_range(len(self.tokens), bounds)
        if end <= beg:
            raise ConfigError(f"--data-path {prefix} (--sft): a split of --split holds no conversation")
        self.order = beg + numpy.random.RandomState(seed).permutation(end - beg)
        self.lengths = numpy.minimum(self.tokens.sequence_lengths[self.order].astype(numpy.int64), self.capacity)
        self.sample_bounds = pack_greedily(self.lengths, self.capacity)
        self.epoch_samples = len(self.sample_bounds) - 1
        self.num_samples = self.epoch_samples if num_samples is None else int(num_samples)

    def clipped(self) -> tuple:
        """(conversations of this split longer than a sample, those of them with no trained token
        left in it): the second train nothing. Reads the loss masks of the clipped ones only."""
        long = self.order[self.tokens.sequence_lengths[self.order] > self.capacity]
        # a label's mask is that of the next token: the first token of a conversation trains nothing
        answerless = sum(1 for d in long.tolist() if not self.masks.get(int(d), 1, self.capacity - 1).any())
        return len(long), answerless

    @property
    def padding_fraction(self) -> float:
        """The share of one epoch's sample tokens that are padding."""
        return 1.0 - float(self.lengths.sum()) / (self.epoch_samples * self.capacity)

    def __len__(self) -> int:
        return self.num_samples

    def conversations(self, i: int) -> numpy.ndarray:
        """The document indices packed into sample `i`, in order."""
        j = int(i) % self.epoch_samples
        return self.order[self.sample_bounds[j]:self.sample_bounds[j + 1]]

    def __getitem__(self, i: int) -> dict:
        docs = self.conversations(i)
        j = int(i) % self.epoch_samples
        lengths = self.lengths[self.sample_bounds[j]:self.sample_bounds[j + 1]]
        used = int(lengths.sum())
        seq = numpy.full(self.capacity, self.eod, dtype=numpy.int64)
        mask = numpy.zeros(self.capacity, dtype=numpy.float32)
        seq[:used] = numpy.concatenate([self.tokens.get(int(d), 0, int(n)) for d, n in zip(docs, lengths)])
        mask[:used] = numpy.concatenate([self.masks.get(int(d), 0, int(n)) for d, n in zip(docs, lengths)])
        # the padding is one more document, so that it restarts the positions too
        starts = numpy.repeat(numpy.cumsum(lengths) - lengths, lengths)
        positions = numpy.arange(self.capacity, dtype=numpy.int64)
        positions[:used] -= starts
        positions[used:] -= used
        return {"tokens": torch.from_numpy(seq[:-1].copy()), "labels": torch.from_numpy(seq[1:].copy()),
                "loss_mask": torch.from_numpy(mask[1:].copy()),
                "position_ids": torch.from_numpy(positions[:-1].copy())}
