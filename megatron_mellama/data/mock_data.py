"""`--mock-data`: megatron-core's MockGPTDataset, random tokens of the model's vocabulary, one domain."""

from __future__ import annotations

import warnings
from typing import Optional

from ..config import Config
from .core_datasets import MegatronTokenizerAdapter, build_once_per_node, builder_sizes, gpt_config
from .mixture import training_samples
from .sample_set import DataSets
from .tokenizer import Tokenizer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron.core's package import warns about optional kernels
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import MockGPTDataset

MOCK_KEY = "mock"  # the domain key of --mock-data


def build_mock_datasets(cfg: Config, tokenizer: Optional[Tokenizer] = None) -> DataSets:
    """Train/valid/test of random tokens; no tokenizer needed (the vocabulary then comes from the
    model config)."""
    vocab = tokenizer.vocab_size if tokenizer else cfg.model.vocab_size
    adapter = (MegatronTokenizerAdapter.wrap(tokenizer) if tokenizer
               else MegatronTokenizerAdapter(vocab, eod=vocab - 1, name="mock"))
    config = gpt_config(cfg, adapter, None)

    def build_mock():
        train, valid, test = BlendedMegatronDatasetBuilder(MockGPTDataset, builder_sizes(cfg), lambda: True,
                                                           config).build()
        return DataSets(training_samples(cfg, [train], {MOCK_KEY: 1.0}, {MOCK_KEY: "mock"}), valid, test)

    return build_once_per_node(build_mock)
