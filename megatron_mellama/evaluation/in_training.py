"""Multiple-choice tasks scored inside a training run (`--eval-tasks`), on the parallel engine.

The task files are read, and every (item, choice) tokenized with the run's tokenizer, once, before
the model is built: a bad file stops the run at once with `FILE:LINE: ...` (a `ConfigError`, exit
code 2), and the evaluations reuse the token lists. Each evaluation scores the rows in batches of
the global batch size, the shape the engine runs: every rank scores the same batches, each data
parallel rank reads its slice of them, and `Engine.sequence_loglikelihoods` gives every rank every
row's log-likelihood, so all ranks compute the same acc and acc_norm. An inf/NaN log-likelihood
means the model diverged: like a NaN validation loss, it stops the run before any save.
"""

from __future__ import annotations

import dataclasses
import math
import time

from ..config import Config, ConfigError
from ..data.tokenizer import TokenizerError
from .requests import RequestError, encode_requests, tokenizer_encoder
from .scoring import NonFiniteLoglikelihood, row_loglikelihoods, score_items
from .tasks import TaskError, load_tasks, parse_task_specs
from ..errors import MellamaError


class DownstreamNotFinite(MellamaError, ValueError):
    """A task's log-likelihood is inf/NaN: the model diverged (the message names the task and item)."""


@dataclasses.dataclass
class _EncodedTask:
    name: str
    path: str
    items: tuple
    requests: list


class DownstreamTasks:
    """The run's `--eval-tasks`, tokenized; `score(engine, dp_rank, dp_size)` scores them all."""

    def __init__(self, cfg: Config, tasks: list[_EncodedTask]):
        self.cfg, self.tasks = cfg, tasks

    @classmethod
    def from_config(cls, cfg: Config) -> DownstreamTasks | None:
        """None without --eval-tasks; raises `ConfigError` (one line) for any file or item that
        cannot be scored."""
        if not cfg.train.eval_tasks:
            return None
        limit = cfg.train.eval_tasks_limit
        try:
            tasks = load_tasks(parse_task_specs(cfg.train.eval_tasks))
            encode = tokenizer_encoder(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
        except (TaskError, TokenizerError) as exc:
            raise ConfigError(f"--eval-tasks: {exc}") from None
        encoded = []
        for task in tasks:
            items = task.items[:limit] if limit else task.items
            try:
                requests = encode_requests(items, encode)
            except RequestError as exc:
                raise ConfigError(f"{task.path}:{items[exc.item].line}: {exc}") from None
            for r in requests:
                # the rows are --seq-length tokens: a longer prompt is left-truncated, a longer choice cannot be
                if len(r.continuation) > cfg.seq_length:
                    raise ConfigError(f"{task.path}:{items[r.item].line}: choice {r.choice} is {len(r.continuation)} "
                                      f"tokens, longer than --seq-length {cfg.seq_length}")
            encoded.append(_EncodedTask(task.name, task.path, items, requests))
        return cls(cfg, encoded)

    def score(self, engine, dp_rank: int, dp_size: int) -> dict[str, dict]:
        """{task: {"acc", "acc_norm", "items", "seconds"}}, the same on every rank; raises
        DownstreamNotFinite, on every rank together (each reads every row), for an inf/NaN row."""
        loglikelihood = engine_loglikelihood_fn(self.cfg, engine, dp_rank, dp_size)
        results = {}
        for task in self.tasks:
            start = time.perf_counter()
            try:
                values = row_loglikelihoods(task.requests, self.cfg.seq_length, loglikelihood,
                                            self.cfg.train.global_batch_size)
            except NonFiniteLoglikelihood as exc:
                raise DownstreamNotFinite(exc.where(task.name, task.path, task.items[exc.item].line)) from None
            per_item = [[] for _ in task.items]
            for request, value in zip(task.requests, values):
                per_item[request.item].append(value)
            score = score_items(task.items, per_item)
            results[task.name] = dict(acc=score.acc, acc_norm=score.acc_norm, items=len(task.items),
                                      seconds=round(time.perf_counter() - start, 3))
        return results


# columns are cut to a multiple of this: few distinct shapes for the kernels' and allocator's caches
COLUMN_MULTIPLE = 128


def engine_loglikelihood_fn(cfg: Config, engine, dp_rank: int, dp_size: int):
    """A `loglikelihood_fn` over global batches of rows: this DP rank's contiguous slice, cut into
    micro-batches as the training data loader cuts a global batch; every row's value back (on the
    CPU: the call's one host read).

    Without pipeline and context parallelism (which fix the sequence's shape) and without compiled
    layers (a new shape would compile again), the columns past the batch's last scored position are
    cut first, as the standalone scorer cuts them: attention is causal, so they cannot change the
    scored positions, and a task of short questions then costs its own length rather than
    --seq-length. The cut is the same on every rank (each holds the whole global batch) and keeps a
    multiple of the TP size, which sequence parallelism splits the sequence by."""
    share = cfg.train.global_batch_size // dp_size
    micro = cfg.train.micro_batch_size
    p = cfg.parallel
    cut = p.pipeline_model_parallel_size == 1 and p.context_parallel_size == 1 and not cfg.train.compile
    multiple = math.lcm(COLUMN_MULTIPLE, p.tensor_model_parallel_size)

    def loglikelihood(tokens, labels, loss_mask):
        if cut:
            columns = loss_mask.any(dim=0).nonzero()  # the rows are still on the CPU: no device read
            used = int(columns[-1]) + 1 if len(columns) else 1
            keep = min(tokens.shape[1], -(-used // multiple) * multiple)
            tokens, labels, loss_mask = tokens[:, :keep], labels[:, :keep], loss_mask[:, :keep]
        batch = dict(tokens=tokens, labels=labels, loss_mask=loss_mask)
        start = dp_rank * share
        micro_batches = [{k: v[i:i + micro] for k, v in batch.items()} for i in range(start, start + share, micro)]
        return engine.sequence_loglikelihoods(micro_batches).cpu()

    return loglikelihood
