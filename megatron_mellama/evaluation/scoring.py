"""Log-likelihoods of choices -> predictions, `acc` and `acc_norm`, as lm-evaluation-harness computes them.

For each item lm-eval's multiple-choice task takes
- `acc`: whether `argmax(ll)` is the answer, `ll[c]` the summed log-likelihood of choice c;
- `acc_norm`: whether `argmax(ll / len(choice))` is the answer, where `len` counts the *characters*
  of the choice string as written (without the leading space delimiter): lm-eval 0.4's
  `completion_len = [float(len(i)) for i in choices]`, not tokens and not bytes.
Ties go to the first choice (numpy's argmax). A task's score is the mean over its items.

`score_task` runs any `loglikelihood_fn(tokens, labels, loss_mask) -> Tensor[B]` (the summed fp32
log-probability of the masked labels of each row, see `requests` for the rows) over a task's rows
in batches of a fixed size: the last batch is filled up with padding rows (mask 0, their results
dropped), so a parallel engine that needs a constant batch shape can serve as `loglikelihood_fn` too. An inf
or NaN log-likelihood is an error (`NonFiniteLoglikelihood`), never a prediction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
import torch

from .requests import Encode, Request, encode_requests, rows_from_requests
from .tasks import Item
from ..errors import MellamaError

LoglikelihoodFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class NonFiniteLoglikelihood(MellamaError, ValueError):
    """A row's log-likelihood is inf or NaN: the model is broken (NaN weights, an overflow), and
    argmax over NaN picks choice 0, so any accuracy it gives is chance, not a score. `item` and
    `choice` name the first such row (`item`: its index in the task's items); `where(task, line)`
    is the one-line message a caller gives."""

    def __init__(self, item: int, choice: int, value: float):
        super().__init__(f"item {item}, choice {choice}: log-likelihood {value}")
        self.item, self.choice, self.value = item, choice, value

    def where(self, task: str, path: str, line: int) -> str:
        return (f"task {task}: {path}:{line}, choice {self.choice}: the log-likelihood is {self.value}: the model "
                "gives inf/NaN log-probabilities (broken weights, or an overflow in its dtype), so no score of it "
                "means anything")


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


def row_loglikelihoods(requests: Sequence[Request], seq_length: int, loglikelihood_fn: LoglikelihoodFn,
                       batch_size: int, progress: Callable[[int], None] | None = None) -> list:
    """`loglikelihood_fn` over the requests' rows in batches of exactly `batch_size`; one float per request.

    Rows are made one batch at a time (all of a large task at the model's length would not fit in
    memory), longest first so that a batch holds rows of similar length: a `loglikelihood_fn` that
    cuts the padding columns then computes little of it. `progress(n)` is called after each batch
    with the number of real rows it held."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    order = sorted(range(len(requests)), key=lambda k: -len(requests[k].context + requests[k].continuation))
    out = [0.0] * len(requests)
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        rows = rows_from_requests([requests[k] for k in chosen], seq_length)
        tokens, labels, loss_mask = rows.tokens, rows.labels, rows.loss_mask
        fill = batch_size - len(chosen)
        if fill:
            tokens = torch.cat([tokens, tokens.new_zeros(fill, seq_length)])
            labels = torch.cat([labels, labels.new_zeros(fill, seq_length)])
            loss_mask = torch.cat([loss_mask, loss_mask.new_zeros(fill, seq_length)])
        # the batch's one host read; the check below reads the floats it brought
        values = loglikelihood_fn(tokens, labels, loss_mask)[:len(chosen)].float().tolist()
        for k, value in zip(chosen, values):
            if not math.isfinite(value):
                raise NonFiniteLoglikelihood(requests[k].item, requests[k].choice, value)
            out[k] = value
        if progress is not None:
            progress(len(chosen))
    return out


def score_task(items: Sequence[Item], encode: Encode, seq_length: int, loglikelihood_fn: LoglikelihoodFn,
               batch_size: int, progress: Callable[[int], None] | None = None) -> TaskScore:
    """Tokenize every (item, choice), score the rows with `loglikelihood_fn`, and take lm-eval's metrics."""
    requests = encode_requests(items, encode)
    values = row_loglikelihoods(requests, seq_length, loglikelihood_fn, batch_size, progress)
    per_item = [[] for _ in items]
    for request, value in zip(requests, values):
        per_item[request.item].append(value)
    return score_items(items, per_item)
