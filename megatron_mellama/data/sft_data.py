"""`--sft`: the blend's SFT prefixes -> train/valid/test sets of packed conversations (`data/sft_dataset.py`),
the training samples blended through `data/mixture.py` as pretraining's are.
"""

from __future__ import annotations

from typing import Optional

import numpy
import torch

from ..config import Config, ConfigError
from .blend import Blend, domain_names
from .chat_template import run_template
from .core_datasets import build_once_per_node
from .mixture import blend_indices, training_samples
from .prefix_checks import check_token_ids, tokenizer_and_vocab
from .sample_set import DataSets, dataset_sizes
from .sft_dataset import SFTDataset, check_pair, pair_of
from .tokenizer import Tokenizer


def build_sft_datasets(cfg: Config, blend: Blend, tokenizer: Optional[Tokenizer] = None) -> DataSets:
    """The blend's SFT datasets, after every prefix's pairs passed `check_pair`; call on every rank."""
    if cfg.data.eod_mask_loss:
        # an answer's closing EOS is what teaches the model to stop: the preprocess mask trains it
        raise ConfigError("--eod-mask-loss does not apply to --sft: the loss mask is the one "
                          "tools/preprocess_sft.py wrote (answers and their closing EOS); drop the flag")
    tokenizer, vocab = tokenizer_and_vocab(cfg, tokenizer)
    for prefix in blend.prefixes:
        check_pair(prefix, cfg)
        check_token_ids(pair_of(prefix)[0], vocab)
    sets = build_once_per_node(lambda: _sft_splits(cfg, blend, tokenizer))
    sets.chat_template, note = run_template(blend.prefixes)
    sets.notes += blend.notes + ([note] if note else [])
    return sets


def _sft_splits(cfg: Config, blend: Blend, tokenizer: Tokenizer) -> DataSets:
    """A DataSets of SFTDatasets over the blend's prefixes."""
    prefixes, weight_of = blend.prefixes, blend.weight_of
    seq_length, seed, eod = cfg.data.seq_length, cfg.train.seed, tokenizer.eod
    _, valid_size, test_size = dataset_sizes(cfg)
    train_bounds, valid_bounds, test_bounds = blend.split_matrix

    def split_of(prefix, bounds, num_samples=None):
        return None if bounds is None else SFTDataset(prefix, bounds, seq_length, seed, eod, num_samples)

    blended = list(weight_of)
    train = None
    if train_bounds is not None:
        one_epochs = [split_of(p, train_bounds) for p in blended]
        for p, ds in zip(blended, one_epochs):
            print(f"sft {p}: {len(ds.order)} train conversations in {ds.epoch_samples} samples, "
                  f"{100 * ds.padding_fraction:.1f}% padding{_clipped_text(ds, seq_length)}", flush=True)
        train = training_samples(cfg, one_epochs, blend.keyed_weights(), blend.names_by_key())
    valid = _blended_split(cfg, blended, weight_of, valid_bounds, valid_size, split_of)
    test = _blended_split(cfg, blended, weight_of, test_bounds, test_size, split_of)
    per_domain = {}
    if len(prefixes) > 1 and valid_bounds is not None:
        per_domain = {name: split_of(p, valid_bounds, valid_size)
                      for name, p in zip(domain_names(prefixes), prefixes)}
    return DataSets(train, valid, test, per_domain)


def _clipped_text(dataset: SFTDataset, seq_length: int) -> str:
    """What the report line of a prefix says about its conversations longer than a sample."""
    clipped, answerless = dataset.clipped()
    if not clipped:
        return ""
    return (f"; {clipped} conversations cut to --seq-length {seq_length} + 1 tokens, {answerless} of them "
            "with no answer token left (they train nothing)")


def _blended_split(cfg, blended: list, weight_of: dict, bounds, num_samples: int, split_of):
    """A validation or test set over the blend's prefixes, mixed by their weights as the training
    samples are (megatron-core's greedy blend), `num_samples` long."""
    if bounds is None or num_samples <= 0:
        return None
    sets = [split_of(p, bounds) for p in blended]
    if len(sets) == 1:
        sets[0].num_samples = num_samples
        return sets[0]
    total = sum(weight_of.values())
    domain, within = blend_indices([weight_of[p] / total for p in blended], num_samples)
    return BlendedSplit(sets, domain, within)


class BlendedSplit(torch.utils.data.Dataset):
    """Sample i of a mixed evaluation set: sample `within[i]` of set `domain[i]`."""

    def __init__(self, sets: list, domain: numpy.ndarray, within: numpy.ndarray):
        self.sets, self.domain, self.within = sets, domain, within

    def __len__(self) -> int:
        return len(self.domain)

    def __getitem__(self, i: int) -> dict:
        return self.sets[int(self.domain[i])][int(self.within[i])]
