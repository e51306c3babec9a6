"""Log-likelihoods of choices -> predictions, `acc` and `acc_norm`, as lm-evaluation-harness computes them.

For each item lm-eval's multiple-choice task takes
- `acc`: whether `argmax(ll)` is the answer, `ll[c]` the summed log-likelihood of choice c;
- `acc_norm`: whether `argmax(ll / len(choice))` is the answer, where `len` counts the *characters*
  of the choice string as written (without the leading space delimiter): lm-eval 0.4's
  `completion_len = [float(len(i)) for i in choices]`, not tokens and not bytes.
Ties go to the first choice (numpy's argmax). A task's score is the mean over its items.

`score_task` runs any `loglikelihood_fn(tokens, labels, loss_mask) -> Tensor[B]` (the summed fp32
log-probability of the masked labels of each row) over a task's rows in batches of a fixed size:
the last batch is filled up with padding rows (mask 0, their results dropped), so a parallel
engine that needs a constant batch shape can serve as `loglikelihood_fn` too.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import torch

from .requests import Encode, Rows, build_rows
from .tasks import Item

LoglikelihoodFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class ItemScore:
    answer: int
    pred: int  # argmax of the log-likelihoods
    pred_norm: int  # argmax of the log-likelihoods per character of the choice
    loglikelihoods: list  # one float per choice


@dataclasses.dataclass
class TaskScore:
    items: list  # ItemScore per item

    @property
    def acc(self) -> float:
        return float(np.mean([s.pred == s.answer for s in self.items]))

    @property
    def acc_norm(self) -> float:
        return float(np.mean([s.pred_norm == s.answer for s in self.items]))


def score_items(items: Sequence[Item], loglikelihoods: Sequence[Sequence[float]]) -> TaskScore:
    """Per-item choices from per-choice log-likelihoods (`loglikelihoods[i][c]` for item i, choice c)."""
    scores = []
    for item, lls in zip(items, loglikelihoods, strict=True):
        lls = np.asarray(lls, dtype=np.float64)
        lengths = np.array([float(len(choice)) for choice in item.choices])
        scores.append(ItemScore(answer=item.answer, pred=int(np.argmax(lls)), pred_norm=int(np.argmax(lls / lengths)),
                                loglikelihoods=lls.tolist()))
    return TaskScore(items=scores)


def row_loglikelihoods(rows: Rows, loglikelihood_fn: LoglikelihoodFn, batch_size: int,
                       progress: Callable[[int], None] | None = None) -> list:
    """`loglikelihood_fn` over `rows` in batches of exactly `batch_size`; one float per row.

    `progress(n)` is called after each batch with the number of real rows it held."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    out = []
    for start in range(0, len(rows), batch_size):
        tokens = rows.tokens[start:start + batch_size]
        labels = rows.labels[start:start + batch_size]
        loss_mask = rows.loss_mask[start:start + batch_size]
        real = tokens.shape[0]
        if real < batch_size:
            fill = batch_size - real
            tokens = torch.cat([tokens, tokens.new_zeros(fill, tokens.shape[1])])
            labels = torch.cat([labels, labels.new_zeros(fill, labels.shape[1])])
            loss_mask = torch.cat([loss_mask, loss_mask.new_zeros(fill, loss_mask.shape[1])])
        values = loglikelihood_fn(tokens, labels, loss_mask)
        out.extend(values[:real].float().tolist())
        if progress is not None:
            progress(real)
    return out


def score_task(items: Sequence[Item], encode: Encode, seq_length: int, loglikelihood_fn: LoglikelihoodFn,
               batch_size: int, progress: Callable[[int], None] | None = None) -> TaskScore:
    """Tokenize every (item, choice), score the rows with `loglikelihood_fn`, and take lm-eval's metrics."""
    rows = build_rows(items, encode, seq_length)
    values = row_loglikelihoods(rows, loglikelihood_fn, batch_size, progress)
    per_item = [[] for _ in items]
    for i, value in zip(rows.item, values):
        per_item[i].append(value)
    return score_items(items, per_item)
