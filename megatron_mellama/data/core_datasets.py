"""megatron-core's GPT datasets as the mock and pretraining pipelines build them: the tokenizer they
read, their config, an index cache keyed by the data's fingerprint, and index caches built once per node.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections import OrderedDict
from unittest import mock

import torch

from ..config import Config
from .index_file import index_fingerprint
from .sample_set import dataset_sizes
from .tokenizer import Tokenizer

with warnings.catch_warnings():
    # Importing megatron.core runs its package __init__, whose optimizer, inference and jit code warns
    # (Transformer Engine and apex missing, deprecations); none of that code is used here.
    warnings.simplefilter("ignore")
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.tokenizers import MegatronTokenizerBase


class IndexedGPTDataset(GPTDataset):
    """megatron-core's GPTDataset whose index cache (document, sample and shuffle .npy files, in
    --data-cache-path or next to the data) is keyed by the sha256 of the prefix's .idx as well.

    megatron-core keys the cache by path, split, seed and length only: after a prefix is
    preprocessed again, its old indices point at documents that moved or no longer exist (an
    IndexError mid-run, or samples cut short and padded). With the fingerprint in the key, new data
    finds no cache entry and its indices are built anew; the samples are otherwise megatron-core's."""

    def _build_document_sample_shuffle_indices(self):
        self.unique_identifiers["idx_sha256"] = index_fingerprint(self.dataset_path)
        self.unique_description = json.dumps(self.unique_identifiers, indent=4,
                                             default=lambda obj: obj.unique_identifiers)
        self.unique_description_hash = hashlib.md5(self.unique_description.encode("utf-8"),
                                                   usedforsecurity=False).hexdigest()
        return super()._build_document_sample_shuffle_indices()


class MegatronTokenizerAdapter(MegatronTokenizerBase):
    """What megatron-core's datasets read from a tokenizer: `vocab_size` (chooses the token dtype),
    `eod`, `pad` (masked out of the loss; -1 when there is none) and `unique_identifiers` (part of the
    index-cache key). The key holds the special ids, not the tokenizer's path: they are all a sample
    depends on, so moving the tokenizer file keeps the caches valid."""

    def __init__(self, vocab_size: int, eod: int, pad: int = -1, name: str = "tokenizer"):
        super().__init__(path="", config={})
        self._vocab_size, self._eod, self._pad, self._name = int(vocab_size), int(eod), int(pad), name

    @classmethod
    def wrap(cls, tokenizer: Tokenizer) -> "MegatronTokenizerAdapter":
        return cls(tokenizer.vocab_size, tokenizer.eod, tokenizer.pad, tokenizer.name)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(tokenizer=self._name, vocab_size=self._vocab_size, eod=self._eod, pad=self._pad)

    @property
    def vocab(self):
        raise NotImplementedError("the dataset adapter carries no vocabulary")

    def tokenize(self, text):
        raise NotImplementedError("the dataset adapter does not tokenize; use data.tokenizer")

    def detokenize(self, ids):
        raise NotImplementedError("the dataset adapter does not detokenize; use data.tokenizer")

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError


def gpt_config(cfg: Config, tokenizer: MegatronTokenizerAdapter, blend) -> GPTDatasetConfig:
    return GPTDatasetConfig(
        random_seed=cfg.train.seed, sequence_length=cfg.data.seq_length, blend=blend,
        split=cfg.data.split if blend else None, path_to_cache=cfg.data.data_cache_path, tokenizer=tokenizer,
        reset_position_ids=cfg.data.reset_position_ids, reset_attention_mask=cfg.data.reset_attention_mask,
        eod_mask_loss=cfg.data.eod_mask_loss,
        # the model builds its document mask from the position ids (no seq x seq mask per sample)
        create_attention_mask=False)


def builder_sizes(cfg: Config) -> list:
    """The samples to ask megatron-core's builder for, per split. It builds each domain's train split
    for one epoch (a sample is all it is asked for); `mixture.TrainingSamples` reads those epochs in
    an order that is a stable prefix."""
    return [1, *dataset_sizes(cfg)[1:]]


@contextlib.contextmanager
def _megatron_sees_one_process():
    """megatron-core 0.16 builds index caches on global rank 0 and has every other rank load them
    (failing where nodes do not share the cache directory), and calls get_rank() without a process
    group when it caches a blend in a single process. `build_once_per_node` coordinates the ranks
    itself, so within this block megatron-core sees one process that builds or loads as needed."""
    with mock.patch.object(torch.distributed, "is_initialized", return_value=False), \
            mock.patch.object(torch.distributed, "get_rank", return_value=0):
        yield


def build_once_per_node(build):
    """Run `build()` on every rank so that index caches are written once per node: first global
    rank 0 (on a shared filesystem it fills the cache for everyone), then local rank 0 of every
    other node (fills its node's cache, or finds the shared one), then all other ranks, which load.
    A barrier separates the waves. Without torch.distributed, just `build()`."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        with _megatron_sees_one_process():
            return build()
    rank = torch.distributed.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    waves = (rank == 0, rank != 0 and local_rank == 0, local_rank != 0)
    result = None
    for mine in waves:
        if mine:
            with _megatron_sees_one_process():
                result = build()
        torch.distributed.barrier()
    return result
