"""`--data-path` blend -> train/valid/test datasets through megatron-core, plus one validation set per domain.

The datasets are megatron-core's own `GPTDataset`s blended by its `BlendedMegatronDatasetBuilder`, so a
corpus, seed and split give the same samples as in Megatron-LM. Each sample is a dict of `tokens`,
`labels` (int64, `seq_length` long) and `loss_mask` (float); no attention mask is built, the model is
causal by construction. Domain names: see `data/blend.py`.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy

from ..config import Config, ConfigError
from .blend import Blend, domain_names
from .core_datasets import (IndexedGPTDataset, MegatronTokenizerAdapter, build_once_per_node, builder_sizes,
                            gpt_config)
from .mixture import training_samples
from .prefix_checks import SPLIT_NAMES, check_prefix, check_token_ids, tokenizer_and_vocab
from .sample_set import DataSets
from .tokenizer import Tokenizer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron.core's package import warns about optional kernels
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import Split


def _domain_valid_set(prefix: str, config: GPTDatasetConfig, num_samples: int) -> GPTDataset:
    """The prefix's validation documents, chosen exactly as the blend's builder chooses them."""
    low_level = IndexedGPTDataset.build_low_level_dataset(prefix, config)
    n = IndexedGPTDataset.numel_low_level_dataset(low_level)
    beg, end = config.split_matrix[Split.valid.value]
    indices = numpy.arange(int(round(beg * float(n))), int(round(end * float(n))), dtype=numpy.int32)
    return IndexedGPTDataset(low_level, prefix, indices, num_samples, Split.valid, config)


def build_pretraining_datasets(cfg: Config, blend: Blend, tokenizer: Optional[Tokenizer] = None) -> DataSets:
    """The blend's datasets, after every prefix passed `prefix_checks`; call on every rank."""
    d = cfg.data
    prefixes, blended, split_matrix = blend.prefixes, blend.blended, blend.split_matrix
    for prefix in prefixes:
        in_blend = prefix in blend.weight_of
        check_prefix(prefix, split_matrix, cfg, SPLIT_NAMES if in_blend else ("valid",))
    weights = None if len(blended) == 1 else [w for w, _ in blended]
    tokenizer, vocab = tokenizer_and_vocab(cfg, tokenizer)
    for prefix in prefixes:
        check_token_ids(prefix, vocab)
    config = gpt_config(cfg, MegatronTokenizerAdapter.wrap(tokenizer), ([p for _, p in blended], weights))
    # Every evaluation reads the same first eval_iters global batches, so that many samples suffice.
    domain_size = cfg.train.eval_iters * cfg.train.global_batch_size

    def build():
        try:
            train, valid, test = BlendedMegatronDatasetBuilder(IndexedGPTDataset, builder_sizes(cfg), lambda: True,
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
            one_epochs = list(train.datasets) if isinstance(train, BlendedDataset) else [train]
            train = training_samples(cfg, one_epochs, blend.keyed_weights(), blend.names_by_key())
        return DataSets(train, valid, test, per_domain, notes=list(blend.notes))

    return build_once_per_node(build)
