"""The pretraining loop: the engine over the blended data, with logging, per-domain evaluation,
checkpoints that resume exactly, and run control (signals, exit limits, skipped steps).

The data position is `consumed_samples` alone: a resumed run reads exactly the samples an
uninterrupted run would have read next.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from .. import kernels
from ..checkpoint.manager import CheckpointManager
from ..config import Config
from ..data.datasets import build_datasets
from ..data.loader import eval_batches, train_batches
from ..parallel.mesh import ParallelDims, init_distributed
from .engine import Engine
from .metrics import MetricsLogger
from .run_control import RunControl


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many consecutive inf/NaN steps); the message says why."""


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _print0(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def train_iterations(cfg: Config) -> int:
    if cfg.train.train_iters is not None:
        return cfg.train.train_iters
    return cfg.train.train_samples // cfg.train.global_batch_size


def evaluate(cfg: Config, engine: Engine, datasets: dict, dp_rank: int, dp_size: int) -> dict:
    """Mean loss of the first --eval-iters global batches of each validation set."""
    results = {}
    for name, dataset in datasets.items():
        losses = [engine.evaluate(gb) for gb in eval_batches(cfg, dataset, dp_rank=dp_rank, dp_size=dp_size)]
        results[name] = sum(losses) / len(losses)
    return results


def _validation_sets(data) -> dict:
    """'all' (the blend) and one per domain; a single-prefix run has only 'all'."""
    sets = {"all": data.valid} if data.valid is not None else {}
    sets.update(data.valid_per_domain)
    return sets


def train(cfg: Config) -> dict:
    """Run (or resume) the job on this process's share of the layout; returns its history."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = _device()
    if world > 1:
        init_distributed(cfg.parallel.distributed_backend)
    try:
        return _train(cfg, world, device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: Config, world: int, device: torch.device) -> dict:
    dims = ParallelDims.from_config(cfg, world)
    meshes = dims.build_mesh(device.type) if world > 1 else None
    rank = dist.get_rank() if world > 1 else 0
    coords = dims.coordinates(rank)

    data = build_datasets(cfg)
    engine = Engine(cfg, meshes, device)
    _print0("kernels: " + ", ".join(f"{op} {backend}" for op, backend in kernels.selected().items()))
    checkpoints = CheckpointManager(cfg, engine)
    state = checkpoints.load() or {}
    iteration = state.get("iteration", 0)
    consumed = state.get("consumed_samples", 0)
    skipped_total = state.get("skipped_total", 0)
    if iteration:
        _print0(f"resumed from {cfg.checkpoint.load} at iteration {iteration}, consumed samples {consumed}")

    batches = train_batches(cfg, data.train, consumed_samples=consumed, dp_rank=coords["dp"], dp_size=dims.dp)
    validation = _validation_sets(data)
    metrics = MetricsLogger(cfg, rank, world, device)
    control = RunControl(cfg)
    history = dict(losses=[], validation=[], stopped=None, start_iteration=iteration, kernels=kernels.selected())
    iterations = train_iterations(cfg)
    last_saved = iteration
    window_start, window_steps = time.perf_counter(), 0
    try:
        while iteration < iterations:
            result = engine.step(next(batches))
            iteration += 1
            consumed = batches.consumed_samples
            skipped_total += int(result.skipped)
            control.record_step(result.skipped)
            history["losses"].append(result.loss)
            window_steps += 1
            if iteration % cfg.logging.log_interval == 0 or iteration in (1, iterations):
                metrics.log_train(iteration, consumed, result, time.perf_counter() - window_start, window_steps,
                                  skipped_total, loss_scale=engine.scaler.loss_scale if cfg.train.fp16 else None)
                window_start, window_steps = time.perf_counter(), 0
            if validation and cfg.train.eval_iters > 0 and (iteration % cfg.train.eval_interval == 0
                                                            or iteration == iterations):
                losses = evaluate(cfg, engine, validation, coords["dp"], dims.dp)
                history["validation"].append(dict(iteration=iteration, **losses))
                metrics.log_eval(iteration, consumed, losses)
                window_start = time.perf_counter()
            too_many = control.too_many_skipped()
            if too_many:
                raise TrainingStopped(too_many)
            extra = dict(skipped_total=skipped_total)
            if cfg.checkpoint.save and cfg.checkpoint.save_interval and iteration % cfg.checkpoint.save_interval == 0:
                checkpoints.save(iteration, consumed, extra)
                last_saved = iteration
            stop, reason, save = control.should_stop(iteration)
            if stop:
                if save and cfg.checkpoint.save and last_saved != iteration:
                    checkpoints.save(iteration, consumed, extra)
                    last_saved = iteration
                history["stopped"] = reason
                _print0(f"stopping at iteration {iteration}: {reason}")
                break
        else:
            if cfg.checkpoint.save and last_saved != iteration:
                checkpoints.save(iteration, consumed, dict(skipped_total=skipped_total))
    finally:
        checkpoints.close()
        metrics.close()
        control.restore_handlers()
    history["iteration"], history["consumed_samples"] = iteration, consumed
    return history
