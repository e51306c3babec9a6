"""Global sample indices -> this data-parallel rank's micro-batches; resumable by consumed samples.

The global batch that starts when `c` samples have been consumed covers the dataset indices
[c, c + global_batch_size). DP rank r of dp takes the contiguous slice of global_batch_size / dp of
them, [c + r * gbs/dp, c + (r + 1) * gbs/dp), cut into micro-batches of micro_batch_size. The samples
of a step therefore depend only on the seed, the data and the global batch size, never on the DP
size, and `consumed_samples` alone is the data position of a run (what a checkpoint stores).

Evaluation reads a fixed set: every evaluation goes through the same first eval_iters global batches
of a validation dataset, so that losses of successive evaluations are comparable.
"""

from __future__ import annotations

import functools
import signal
from typing import Optional

import torch

from .mixture import DomainTagged

KEYS = ("tokens", "labels", "loss_mask")
# with --reset-position-ids (megatron-core computes them per sample; otherwise they are 0..s-1)
POSITION_KEYS = KEYS + ("position_ids",)


class GlobalBatchSampler:
    """A DataLoader `batch_sampler`: this rank's micro-batches (lists of dataset indices), one global
    batch after another, from `consumed_samples` up to the last whole global batch in `total_samples`."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global batch size {global_batch_size} is not a multiple of micro batch size "
                             f"{micro_batch_size} x data-parallel size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"data-parallel rank {dp_rank} outside [0, {dp_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed samples must not be negative, got {consumed_samples}")
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def num_global_batches(self) -> int:
        return max(0, (self.total_samples - self.consumed_samples) // self.global_batch_size)

    def __len__(self) -> int:
        return self.num_global_batches() * self.num_microbatches

    def __iter__(self):
        per_rank = self.global_batch_size // self.dp_size
        for b in range(self.num_global_batches()):
            first = self.consumed_samples + b * self.global_batch_size + self.dp_rank * per_rank
            for m in range(self.num_microbatches):
                start = first + m * self.micro_batch_size
                yield list(range(start, start + self.micro_batch_size))


def collate(samples: list, keys: tuple = KEYS, document_ids: bool = False) -> dict:
    """Stack samples into a micro-batch: `tokens`, `labels` int64 [b, s]; `loss_mask` float [b, s];
    with `keys` POSITION_KEYS also `position_ids` int64 [b, s], and with `document_ids` the index
    of each token's document within its sample (`document_ids_of`)."""
    batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys}
    if document_ids:
        batch["document_ids"] = document_ids_of(batch["position_ids"])
    return batch


def document_ids_of(position_ids: torch.Tensor) -> torch.Tensor:
    """Which packed document each token belongs to, 0, 1, ... along each row, from position ids that
    restart at 0 where a document starts (megatron-core's --reset-position-ids: right after each
    EOD, so an EOD belongs to the document it ends). Non-decreasing along the row."""
    return torch.cumsum(position_ids == 0, dim=-1) - 1


def collate_for(cfg, domain: bool = False) -> functools.partial:
    """The collate function of `cfg`'s data flags: without them the batch is exactly `collate`'s.
    `domain`: each row's domain index too (`mixture.DomainTagged` samples)."""
    d = cfg.data
    keys = (POSITION_KEYS if d.reset_position_ids else KEYS) + (("domain",) if domain else ())
    return functools.partial(collate, keys=keys, document_ids=d.reset_attention_mask)


# what schedulers send before a preemption or time limit (SIGUSR1 does not exist on Windows)
STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """Data-loader workers ignore SIGTERM and SIGUSR1.

    SLURM and torchrun signal every process of the job, workers included. A worker that died of
    the signal would make the DataLoader raise in the trainer ("worker ... is killed by signal")
    before the trainer reached the step boundary where it saves. The trainer alone decides; its
    workers end with it (the DataLoader shuts them down, or they see their parent gone)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def make_loader(dataset, sampler: GlobalBatchSampler, num_workers: int = 0,
                collate_fn=collate) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate_fn, pin_memory=torch.cuda.is_available(),
                                       worker_init_fn=ignore_stop_signals if num_workers else None)


class TrainBatches:
    """The training loop's data: `next(batches)` is this rank's next global batch as a list of
    micro-batch dicts; `consumed_samples` (advanced by the global batch size at each `next`) is what
    to checkpoint, and constructing with it resumes at exactly the next sample."""

    def __init__(self, dataset, *, micro_batch_size: int, global_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, consumed_samples: int = 0, num_workers: int = 0,
                 total_samples: Optional[int] = None, collate_fn=collate):
        total = len(dataset) if total_samples is None else total_samples
        self.sampler = GlobalBatchSampler(total, consumed_samples, micro_batch_size, global_batch_size,
                                          dp_rank, dp_size)
        self.consumed_samples = consumed_samples
        self.global_batch_size = global_batch_size
        self._micro_batches = iter(make_loader(dataset, self.sampler, num_workers, collate_fn))

    def __iter__(self):
        return self

    def close(self) -> None:
        """Stop the worker processes now. They ignore SIGTERM (see `ignore_stop_signals`), so they
        must be shut down through the DataLoader, not left to the interpreter's exit, which
        terminates daemon processes with SIGTERM and then waits for them."""
        shutdown = getattr(self._micro_batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __next__(self) -> list:
        # A short global batch would change the loss normalisation; the sampler yields whole ones only.
        batch = [next(self._micro_batches) for _ in range(self.sampler.num_microbatches)]
        self.consumed_samples += self.global_batch_size
        return batch


class EvalBatches:
    """A validation set as a fixed sequence: each `iter()` yields the same first `eval_iters` global
    batches (lists of micro-batch dicts for this rank)."""

    def __init__(self, dataset, *, eval_iters: int, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, num_workers: int = 0, collate_fn=collate):
        total = eval_iters * global_batch_size
        if len(dataset) < total:
            raise ValueError(f"validation set of {len(dataset)} samples is shorter than --eval-iters {eval_iters} x "
                             f"--global-batch-size {global_batch_size}")
        self.eval_iters = eval_iters
        self.sampler = GlobalBatchSampler(total, 0, micro_batch_size, global_batch_size, dp_rank, dp_size)
        self.loader = make_loader(dataset, self.sampler, num_workers, collate_fn)

    def __len__(self) -> int:
        return self.eval_iters

    def __iter__(self):
        micro_batches = iter(self.loader)
        for _ in range(self.eval_iters):
            yield [next(micro_batches) for _ in range(self.sampler.num_microbatches)]


def train_batches(cfg, dataset, *, consumed_samples: int, dp_rank: int, dp_size: int) -> TrainBatches:
    """`TrainBatches` with the micro/global batch size and workers of `cfg` (a Config); with
    --log-loss-per-domain each micro-batch has `domain` (each row's domain index) too."""
    t = cfg.train
    by_domain = cfg.logging.log_loss_per_domain
    return TrainBatches(DomainTagged(dataset) if by_domain else dataset, micro_batch_size=t.micro_batch_size,
                        global_batch_size=t.global_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                        consumed_samples=consumed_samples, num_workers=cfg.data.num_workers,
                        collate_fn=collate_for(cfg, domain=by_domain))


def eval_batches(cfg, dataset, *, dp_rank: int, dp_size: int) -> EvalBatches:
    """`EvalBatches` over the first `--eval-iters` global batches of `dataset`."""
    t = cfg.train
    return EvalBatches(dataset, eval_iters=t.eval_iters, micro_batch_size=t.micro_batch_size,
                       global_batch_size=t.global_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                       num_workers=cfg.data.num_workers, collate_fn=collate_for(cfg))
