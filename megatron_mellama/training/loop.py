"""The pretraining loop: the engine over the blended data, with console logging and per-domain
evaluation. Checkpoints, TensorBoard and run control (signals, exit limits) are not part of it yet.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from ..config import Config
from ..data.datasets import build_datasets
from ..data.loader import eval_batches, train_batches
from ..model.flops import training_flops_per_token
from ..parallel.mesh import ParallelDims, init_distributed
from .engine import Engine


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


def train(cfg: Config) -> dict:
    """Run `--train-iters` steps on this process's share of the layout; returns the history."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = _device()
    if world > 1:
        init_distributed(cfg.parallel.distributed_backend)
    dims = ParallelDims.from_config(cfg, world)
    meshes = dims.build_mesh(device.type) if world > 1 else None
    coords = dims.coordinates(dist.get_rank() if world > 1 else 0)

    data = build_datasets(cfg)
    engine = Engine(cfg, meshes, device)
    batches = train_batches(cfg, data.train, consumed_samples=0, dp_rank=coords["dp"], dp_size=dims.dp)
    validation = dict(data.valid_per_domain) or ({"all": data.valid} if data.valid is not None else {})
    if len(data.valid_per_domain) > 1 and data.valid is not None:
        validation = {"all": data.valid, **validation}

    tokens_per_step = cfg.train.global_batch_size * cfg.seq_length
    flops_per_token = training_flops_per_token(cfg.model, cfg.seq_length)
    history = dict(losses=[], validation=[])
    iterations = train_iterations(cfg)
    window_start, window_steps = time.perf_counter(), 0
    for iteration in range(1, iterations + 1):
        result = engine.step(next(batches))
        history["losses"].append(result.loss)
        window_steps += 1
        if iteration % cfg.logging.log_interval == 0 or iteration in (1, iterations):
            elapsed = time.perf_counter() - window_start
            rate = window_steps * tokens_per_step / elapsed
            _print0(f"iteration {iteration:>6}/{iterations} | consumed samples {batches.consumed_samples:>9} | "
                    f"lr {result.lr:.3e} | lm loss {result.loss:.4f} | grad norm {result.grad_norm:.3f} | "
                    f"skipped {int(result.skipped)} | {rate:,.0f} tokens/s | "
                    f"{rate * flops_per_token / 1e12 / max(world, 1):.3g} TFLOP/s per process")
            window_start, window_steps = time.perf_counter(), 0
        if validation and cfg.train.eval_iters > 0 and (iteration % cfg.train.eval_interval == 0
                                                        or iteration == iterations):
            losses = evaluate(cfg, engine, validation, coords["dp"], dims.dp)
            history["validation"].append(dict(iteration=iteration, **losses))
            _print0(f"validation at iteration {iteration}: " +
                    " | ".join(f"lm loss validation{'' if k == 'all' else '/' + k} {v:.4f}"
                               for k, v in losses.items()))
            window_start = time.perf_counter()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return history
