"""What the training loop needs of a run's data: the `SampleSet` contract and the `DataSets` record.

`datasets.build_datasets` hands the loop a `DataSets`; its `train` is a `SampleSet`. The loop reads
the samples by global index (through `data/loader.py`), reports each domain's consumed samples,
records the data order in every checkpoint and, on resume, continues that order from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, runtime_checkable

import torch

from ..config import Config, ConfigError


@runtime_checkable
class SampleSet(Protocol):
    """The training samples of a run, as the loop uses them.

    Sample `i` is the run's global sample `i` (a dict of `tokens`, `labels`, `loss_mask`, and
    `position_ids` where the data flags ask for them); which sample it is depends on the position
    alone, never on the data-parallel size, so `consumed_samples` is the whole data position of a
    run. `mixture.TrainingSamples` is the implementation every pipeline uses.

    A new source of samples (megatron-core's object-storage reader, say) goes in one place: a module
    `data/<kind>_data.py` whose `build` returns a `DataSets`, chosen by `datasets.build_datasets`.
    Where the source yields one epoch of each domain as an indexable dataset, wrapping those in
    `mixture.TrainingSamples` (as the mock, pretraining and SFT pipelines do) gives this contract,
    blend changes on resume included; otherwise the source implements these methods itself."""

    def __len__(self) -> int:
        """The run's training samples."""

    def __getitem__(self, i: int) -> dict:
        """Global sample `i`."""

    def consumed_per_domain(self, position: int) -> dict:
        """Samples of each domain (by key) read before global sample `position`."""

    def named(self, per_key: dict) -> dict:
        """Per-domain values keyed by domain name (for logs), from values keyed by domain key."""

    def state(self, position: int) -> dict:
        """What a checkpoint at `position` records of the data order (JSON)."""

    def continued(self, saved: Optional[dict], position: int) -> tuple:
        """(the samples of a run resuming at `position` from a checkpoint whose `state` was `saved`,
        lines saying what changed)."""


@dataclass
class DataSets:
    """The datasets of a run. A split whose `--split` share is 0 is None. `valid_per_domain` maps each
    domain name to the validation split of that prefix alone (in `--data-path` order); it is empty
    when there is only one prefix, whose validation set is `valid`."""

    train: Optional[SampleSet]
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
