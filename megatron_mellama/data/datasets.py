"""`--data-path` blend -> train/valid/test datasets through megatron-core, plus one validation set per domain.

The datasets are megatron-core's own `GPTDataset`s blended by its `BlendedMegatronDatasetBuilder`, so a
corpus, seed and split give the same samples as in Megatron-LM. Each sample is a dict of `tokens`,
`labels` (int64, `seq_length` long) and `loss_mask` (float); no attention mask is built, the model is
causal by construction.

Domain names (keys of `DataSets.valid_per_domain`, reported as `lm loss validation/<name>`): the last
component of the prefix without the `_text_document` / `_document` suffix that `preprocess_data.py`
appends (`data/pubmed_text_document` -> `pubmed`). Prefixes that would share a name take as many parent
directories as tell them apart, joined by `-` (`a/train_text_document`, `b/train_text_document` ->
`a-train`, `b-train`). A prefix listed twice, under any spelling (`data/x`, `./data/x`), is one domain.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Optional
from unittest import mock

import numpy
import torch

from ..config import Config, ConfigError, parse_data_path, parse_split
from .mixture import DomainStream, TrainingSamples, segment
from .tokenizer import Tokenizer, build_tokenizer

with warnings.catch_warnings():
    # Importing megatron.core runs its package __init__, whose optimizer, inference and jit code warns
    # (Transformer Engine and apex missing, deprecations); none of that code is used here.
    warnings.simplefilter("ignore")
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                        parse_and_normalize_split)
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.core.datasets.utils import Split
    from megatron.core.tokenizers import MegatronTokenizerBase

SPLIT_NAMES = ("train", "valid", "test")


class IndexedGPTDataset(GPTDataset):
    """megatron-core's GPTDataset whose index cache (document, sample and shuffle .npy files, in
    --data-cache-path or next to the data) is keyed by the sha256 of the prefix's .idx as well.

    megatron-core keys the cache by path, split, seed and length only: after a prefix is
    preprocessed again, its old indices point at documents that moved or no longer exist (an
    IndexError mid-run, or samples cut short and padded). With the fingerprint in the key, new data
    finds no cache entry and its indices are built anew; the samples are otherwise megatron-core's."""

    def _build_document_sample_shuffle_indices(self):
        from .index_file import index_fingerprint

        self.unique_identifiers["idx_sha256"] = index_fingerprint(self.dataset_path)
        self.unique_description = json.dumps(self.unique_identifiers, indent=4,
                                             default=lambda obj: obj.unique_identifiers)
        self.unique_description_hash = hashlib.md5(self.unique_description.encode("utf-8"),
                                                   usedforsecurity=False).hexdigest()
        return super()._build_document_sample_shuffle_indices()


MOCK_KEY = "mock"  # the domain key of --mock-data


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


@dataclass
class DataSets:
    """The datasets of a run. A split whose `--split` share is 0 is None. `valid_per_domain` maps each
    domain name to the validation split of that prefix alone (in `--data-path` order); it is empty
    when there is only one prefix, whose validation set is `valid`."""

    train: Optional[torch.utils.data.Dataset]
    valid: Optional[torch.utils.data.Dataset]
    test: Optional[torch.utils.data.Dataset]
    valid_per_domain: dict = field(default_factory=dict)
    # --sft: the chat template every prefix was rendered with (None when they disagree or have
    # none; `notes` then says so), which checkpoints record for the export
    chat_template: Optional[str] = None
    notes: list = field(default_factory=list)  # lines for the run to print once


def dataset_sizes(cfg: Config) -> tuple:
    """Samples per split: the run's training samples (as Megatron-LM counts them), and the
    `--eval-iters` global batches every evaluation reads (validation) or the test reads. Neither
    validation nor test depends on the run's length, so extending a run keeps its validation set."""
    t = cfg.train
    gbs = t.global_batch_size
    if t.train_samples is not None:
        train = t.train_samples
    elif t.train_iters is not None:
        train = t.train_iters * gbs
    else:
        raise ConfigError("--train-iters or --train-samples is needed to size the training set")
    return train, t.eval_iters * gbs, t.eval_iters * gbs


def domain_names(prefixes: list) -> list:
    """A distinct, readable name per (distinct) prefix; see the module docstring for the rule."""
    def parts(prefix):
        comps = [c for c in os.path.normpath(prefix).split(os.sep) if c not in ("", ".")]
        last = comps[-1]
        for suffix in ("_text_document", "_document"):
            if last.endswith(suffix) and len(last) > len(suffix):
                last = last[: -len(suffix)]
                break
        return comps[:-1] + [last]

    comps = [parts(p) for p in prefixes]
    depth = [1] * len(prefixes)
    while True:
        names = ["-".join(c[-d:]) for c, d in zip(comps, depth)]
        clashes = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(comps[i])]
        if not clashes:
            break
        for i in clashes:
            depth[i] += 1
    seen = {}
    for i, n in enumerate(names):  # only paths that differ in ways normpath hides (e.g. a/b vs a//b/)
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            names[i] = f"{n}-{seen[n]}"
    return names


def same_prefix_once(pairs: list) -> tuple:
    """`--data-path` pairs with every spelling of one prefix (`data/x`, `./data/x`, `/abs/data/x`,
    a symlink to it) written as its first spelling, and a line per prefix spelt more than one way.

    The datasets, their weights, domain names and checkpoint keys all follow from the prefix, so two
    spellings of one prefix must be one domain with the sum of their weights (the blend the user
    listed), as a prefix listed twice verbatim is; anything else pairs one domain's weight with
    another's data. Merged rather than refused: Megatron-LM itself blends repeated prefixes."""
    first, spellings = {}, {}
    for _, prefix in pairs:
        identity = os.path.realpath(prefix)
        first.setdefault(identity, prefix)
        names = spellings.setdefault(identity, [])
        if prefix not in names:
            names.append(prefix)
    notes = [f"--data-path: {' and '.join(repr(s) for s in names)} are one prefix: one domain "
             f"'{names[0]}' with the sum of their weights"
             for names in spellings.values() if len(names) > 1]
    return [(w, first[os.path.realpath(p)]) for w, p in pairs], notes


def _check_prefix(prefix: str, split_matrix: list, cfg: Config, splits=SPLIT_NAMES) -> None:
    """Fail with one line, on every rank, before megatron-core would fail deep down (or, for a split
    shorter than one sample, loop forever counting epochs).

    The .idx is parsed without megatron-core's reader (which asserts on a bad file): header, counts,
    and that the .bin holds exactly the bytes the index describes (sum of sequence lengths x token
    size, and the last sequence's offset + length), so a short .bin fails here instead of mid-run and
    a long one (misaligned data) does not train silently. Only the .idx is read, never the tokens."""
    from .index_file import DatasetError, read_index

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
    from .index_file import read_index
    from .indexed_writer import read_stats

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


def _check_token_ids(prefix: str, vocab: int) -> None:
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


def _gpt_config(cfg: Config, tokenizer: MegatronTokenizerAdapter, blend) -> GPTDatasetConfig:
    return GPTDatasetConfig(
        random_seed=cfg.train.seed, sequence_length=cfg.data.seq_length, blend=blend,
        split=cfg.data.split if blend else None, path_to_cache=cfg.data.data_cache_path, tokenizer=tokenizer,
        reset_position_ids=cfg.data.reset_position_ids, reset_attention_mask=cfg.data.reset_attention_mask,
        eod_mask_loss=cfg.data.eod_mask_loss,
        # the model builds its document mask from the position ids (no seq x seq mask per sample)
        create_attention_mask=False)


def _domain_valid_set(prefix: str, config: GPTDatasetConfig, num_samples: int) -> GPTDataset:
    """The prefix's validation documents, chosen exactly as the blend's builder chooses them."""
    low_level = IndexedGPTDataset.build_low_level_dataset(prefix, config)
    n = IndexedGPTDataset.numel_low_level_dataset(low_level)
    beg, end = config.split_matrix[Split.valid.value]
    indices = numpy.arange(int(round(beg * float(n))), int(round(end * float(n))), dtype=numpy.int32)
    return IndexedGPTDataset(low_level, prefix, indices, num_samples, Split.valid, config)


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


def build_datasets(cfg: Config, tokenizer: Optional[Tokenizer] = None) -> DataSets:
    """Train/valid/test (and per-domain validation) datasets for `cfg`; call on every rank.

    `tokenizer` defaults to the one `--tokenizer-type/--tokenizer-model` name. With `--mock-data`,
    megatron-core's MockGPTDataset (no tokenizer needed: the vocabulary comes from the model config).
    """
    sizes = list(dataset_sizes(cfg))
    # megatron-core builds each domain's train split for one epoch (a sample is all it is asked
    # for); `mixture.TrainingSamples` reads those epochs in an order that is a stable prefix
    builder_sizes = [1, *sizes[1:]]
    d = cfg.data
    if d.mock_data:
        vocab = tokenizer.vocab_size if tokenizer else cfg.model.vocab_size
        adapter = (MegatronTokenizerAdapter.wrap(tokenizer) if tokenizer
                   else MegatronTokenizerAdapter(vocab, eod=vocab - 1, name="mock"))
        config = _gpt_config(cfg, adapter, None)

        def build_mock():
            train, valid, test = BlendedMegatronDatasetBuilder(MockGPTDataset, builder_sizes, lambda: True,
                                                               config).build()
            return DataSets(_training_samples(cfg, [train], {MOCK_KEY: 1.0}, {MOCK_KEY: "mock"}), valid, test)

        return build_once_per_node(build_mock)
    if not d.data_path:
        raise ConfigError("--data-path is required (or --mock-data)")

    pairs, notes = same_prefix_once(parse_data_path(d.data_path))
    prefixes = list(dict.fromkeys(p for _, p in pairs))
    parse_split(d.split)
    split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(d.split))
    # A weight of 0 keeps a prefix out of the blend; it is still validated on as its own domain. A
    # prefix listed twice is one domain with the sum of its weights (not two copies of one order).
    weight_of = {}
    for w, p in pairs:
        if w > 0:
            weight_of[p] = weight_of.get(p, 0.0) + w
    blended = [(w, p) for p, w in weight_of.items()]
    if d.sft:
        if d.eod_mask_loss:
            # an answer's closing EOS is what teaches the model to stop: the preprocess mask trains it
            raise ConfigError("--eod-mask-loss does not apply to --sft: the loss mask is the one "
                              "tools/preprocess_sft.py wrote (answers and their closing EOS); drop the flag")
        from .chat_template import run_template
        from .sft_dataset import build_sft_datasets, check_pair, pair_of

        tokenizer, vocab = _tokenizer_and_vocab(cfg, tokenizer)
        for prefix in prefixes:
            check_pair(prefix, cfg)
            _check_token_ids(pair_of(prefix)[0], vocab)
        sets = build_once_per_node(lambda: build_sft_datasets(cfg, prefixes, weight_of, tokenizer, split_matrix))
        sets.chat_template, note = run_template(prefixes)
        sets.notes += notes + ([note] if note else [])
        return sets
    for prefix in prefixes:
        in_blend = any(p == prefix for _, p in blended)
        _check_prefix(prefix, split_matrix, cfg, SPLIT_NAMES if in_blend else ("valid",))
    weights = None if len(blended) == 1 else [w for w, _ in blended]
    tokenizer, vocab = _tokenizer_and_vocab(cfg, tokenizer)
    for prefix in prefixes:
        _check_token_ids(prefix, vocab)
    config = _gpt_config(cfg, MegatronTokenizerAdapter.wrap(tokenizer), ([p for _, p in blended], weights))
    # Every evaluation reads the same first eval_iters global batches, so that many samples suffice.
    domain_size = cfg.train.eval_iters * cfg.train.global_batch_size

    def build():
        try:
            train, valid, test = BlendedMegatronDatasetBuilder(IndexedGPTDataset, builder_sizes, lambda: True,
                                                               config).build()
            per_domain = {}
            if len(prefixes) > 1 and split_matrix[Split.valid.value] is not None:
                per_domain = {name: _domain_valid_set(prefix, config, domain_size)
                              for name, prefix in zip(domain_names(prefixes), prefixes)}
        except OSError as err:  # the prefixes were readable above: this is the index cache
            where = d.data_cache_path or "next to the data, as --data-cache-path is not set"
            raise ConfigError(f"--data-cache-path: cannot write the dataset index cache ({where}): "
                              f"{err.strerror or err}: {err.filename}") from err
        if train is not None:
            keys = [os.path.abspath(p) for _, p in blended]
            names = dict(zip(map(os.path.abspath, prefixes), domain_names(prefixes)))
            one_epochs = list(train.datasets) if isinstance(train, BlendedDataset) else [train]
            train = _training_samples(cfg, one_epochs, {k: w for k, (w, _) in zip(keys, blended)}, names)
        return DataSets(train, valid, test, per_domain, notes=list(notes))

    return build_once_per_node(build)


def _tokenizer_and_vocab(cfg: Config, tokenizer: Optional[Tokenizer]) -> tuple:
    """The run's tokenizer (the one given, or --tokenizer-type/--tokenizer-model's) and the model's
    padded vocabulary (the tokenizer's, padded the same way, when --vocab-size is not set)."""
    d, m = cfg.data, cfg.model
    if tokenizer is None:
        if d.tokenizer_model is None:
            raise ConfigError(f"--tokenizer-type {d.tokenizer_type} needs --tokenizer-model")
        tokenizer = build_tokenizer(d.tokenizer_type, d.tokenizer_model)
    vocab = (m if m.vocab_size is not None else replace(m, vocab_size=tokenizer.vocab_size)).padded_vocab_size
    return tokenizer, vocab


def _training_samples(cfg: Config, one_epochs: list, weights: dict, names: dict) -> Optional[TrainingSamples]:
    """A fresh run's training samples: one blend segment from sample 0, every domain at its start."""
    if one_epochs[0] is None:
        return None
    streams = {key: DomainStream(ds, cfg.train.seed) for key, ds in zip(weights, one_epochs)}
    return TrainingSamples(streams, names, [segment(0, weights, {k: 0 for k in weights})], dataset_sizes(cfg)[0])
