"""The run's datasets: `build_datasets` hands each kind of data to its pipeline.

    --mock-data          data/mock_data.py         megatron-core's MockGPTDataset
    --data-path --sft    data/sft_data.py          packed conversations of tools/preprocess_sft.py
    --data-path          data/pretraining_data.py  megatron-core's GPTDatasets of tools/preprocess_data.py

Each returns a `DataSets` whose `train` is a `SampleSet` (data/sample_set.py: what the training loop
needs of its samples); a new source of samples is one more module and one more branch here.
"""

from __future__ import annotations

from typing import Optional

from ..config import Config, ConfigError
from .blend import Blend
from .mock_data import build_mock_datasets
from .pretraining_data import build_pretraining_datasets
from .sample_set import DataSets, dataset_sizes
from .sft_data import build_sft_datasets
from .tokenizer import Tokenizer


def build_datasets(cfg: Config, tokenizer: Optional[Tokenizer] = None) -> DataSets:
    """Train/valid/test (and per-domain validation) datasets for `cfg`; call on every rank.

    `tokenizer` defaults to the one `--tokenizer-type/--tokenizer-model` name. With `--mock-data`,
    megatron-core's MockGPTDataset (no tokenizer needed: the vocabulary comes from the model config).
    """
    dataset_sizes(cfg)  # a run without a length fails on that first, whatever its data
    if cfg.data.mock_data:
        return build_mock_datasets(cfg, tokenizer)
    if not cfg.data.data_path:
        raise ConfigError("--data-path is required (or --mock-data)")
    blend = Blend.from_config(cfg)
    if cfg.data.sft:
        return build_sft_datasets(cfg, blend, tokenizer)
    return build_pretraining_datasets(cfg, blend, tokenizer)
