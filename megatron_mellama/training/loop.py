"""The pretraining loop: the engine over the blended data, with logging, per-domain evaluation,
checkpoints that resume exactly, and run control (signals, exit limits, skipped steps).

The data position is `consumed_samples` with each domain's own count (`data/mixture.py`): a resumed
run reads exactly the samples an uninterrupted run would have read next, and a resumed run with
another blend continues every domain where it stopped.
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .. import kernels
from ..checkpoint.layout import CheckpointError, checkpoint_dir, latest_iteration
from ..checkpoint.manager import CheckpointManager
from ..checkpoint.resume import checkpoint_to_load
from ..checkpoint.pretrained_start import resolve_start
from ..checkpoint.save_root import check_save_root
from ..checkpoint.trained_tokenizer import check_finetune_tokenizer
from ..config import Config
from ..data.datasets import build_datasets
from ..data.loader import eval_batches, train_batches
from ..evaluation.in_training import DownstreamNotFinite, DownstreamTasks
from ..parallel.mesh import ParallelDims, init_distributed, local_device
from .engine import Engine
from .metrics import MetricsLogger
from .run_control import RunControl
from .stop_signals import StopSignals
from ..errors import MellamaError


class TrainingStopped(MellamaError, RuntimeError):
    """The run cannot go on (e.g. too many consecutive inf/NaN steps); the message says why."""


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


def train(cfg: Config, signals: StopSignals | None = None) -> dict:
    """Run (or resume) the job on this process's share of the layout; returns its history.

    `signals`: a stop-signal catcher installed earlier (`pretrain` installs one first thing)."""
    # a run that would write over checkpoints it does not continue, or read a checkpoint's weights
    # with another tokenizer, stops here, before any work
    start = resolve_start(cfg)
    if start:
        _print0(start)
    check_save_root(cfg)
    check_finetune_tokenizer(cfg)
    # Then, before minutes of start-up (process group, data index, a 70B checkpoint load): a
    # preemption signal that arrives meanwhile is kept, and acted on as soon as training could
    # save, instead of killing the process.
    control = RunControl(cfg, signals=signals)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        if world > 1:
            device = init_distributed(cfg.parallel.distributed_backend, cfg.parallel.distributed_timeout_minutes)
        else:
            device = local_device()
        control.device = device
        return _train(cfg, world, device, control)
    finally:
        control.restore_handlers()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: Config, world: int, device: torch.device, control: RunControl) -> dict:
    # the task files are checked (and tokenized) before any data, model or checkpoint work
    downstream = DownstreamTasks.from_config(cfg)
    dims = ParallelDims.from_config(cfg, world)
    meshes = dims.build_mesh(device.type) if world > 1 else None
    rank = dist.get_rank() if world > 1 else 0
    coords = dims.coordinates(rank)

    data = build_datasets(cfg)
    for line in data.notes:
        _print0(line)
    # a checkpoint to load provides every weight (a load that lacks one fails): no random values
    # are generated only to be overwritten (minutes at 70B)
    ckpt = checkpoint_to_load(cfg)
    engine = Engine(cfg, meshes, device, initialise=ckpt is None)
    _print0("kernels: " + ", ".join(f"{op} {backend}" for op, backend in kernels.selected().items()))
    checkpoints = CheckpointManager(cfg, engine)
    # the directory found above: should `latest` move meanwhile, this still loads (or fails), and
    # never leaves the uninitialised engine as it is
    state = checkpoints.load(ckpt) or {}
    iteration = state.get("iteration", 0)
    consumed = state.get("consumed_samples", 0)
    samples = data.train
    if iteration:
        _print0(f"resumed from {cfg.checkpoint.load} at iteration {iteration}, consumed samples {consumed}")
        # each domain continues its own order where the checkpoint left it, whatever the blend now
        samples, changes = samples.continued(state.get("data_order"), consumed)
        for line in changes:
            _print0(line)

    history = dict(losses=[], validation=[], stopped=None, start_iteration=iteration, kernels=kernels.selected(),
                   iteration=iteration, consumed_samples=consumed)
    metrics = MetricsLogger(cfg, rank, world, device)
    try:
        iterations = train_iterations(cfg)
        if iteration >= iterations:
            # as Megatron-LM, exit 0 (a requeued job that had finished is no failure), but say so
            unit = (f"--train-iters {cfg.train.train_iters}" if cfg.train.train_iters is not None else
                    f"--train-samples {cfg.train.train_samples} ({iterations} iterations)")
            history["stopped"] = (f"the run is already complete at iteration {iteration} (checkpoint in --load "
                                  f"{cfg.checkpoint.load}; {unit}): nothing to train, nothing saved")
            _print0(history["stopped"])
            return history
        if control.preempted():
            # nothing was trained since the checkpoint this run started from: nothing to save
            history["stopped"] = "a stop signal arrived during start-up"
            _print0(f"stopping before the first iteration: {history['stopped']}")
            return history
        batches = train_batches(cfg, samples, consumed_samples=consumed, dp_rank=coords["dp"], dp_size=dims.dp)
        try:
            # what a checkpoint keeps besides the data position: an SFT run's chat template, for the export
            kept = dict(chat_template=data.chat_template) if data.chat_template is not None else {}
            _Steps(cfg, engine, checkpoints, metrics, control, history, coords["dp"], dims.dp, downstream).run(
                batches, samples, _validation_sets(data), state.get("skipped_total", 0), kept)
        finally:
            batches.close()
    finally:
        checkpoints.close()
        metrics.close()
    return history


class _Steps:
    """The iterations of one run, from where it (re)started; updates `history` as it goes."""

    def __init__(self, cfg, engine, checkpoints, metrics, control, history, dp_rank, dp_size, downstream=None):
        self.cfg, self.engine, self.checkpoints, self.metrics = cfg, engine, checkpoints, metrics
        self.control, self.history, self.dp_rank, self.dp_size = control, history, dp_rank, dp_size
        self.downstream = downstream

    def run(self, batches, samples, validation: dict, skipped_total: int, kept: dict) -> None:
        cfg, engine, control, history = self.cfg, self.engine, self.control, self.history
        iteration, iterations = history["iteration"], train_iterations(cfg)
        last_saved = iteration
        owed = False  # a periodic save put off by a skipped iteration, made at the next good one
        window_start, window_steps = time.perf_counter(), 0
        while iteration < iterations:
            result = engine.step(next(batches))
            iteration += 1
            consumed = batches.consumed_samples
            history.update(iteration=iteration, consumed_samples=consumed)
            skipped_total += int(result.skipped)
            scaler = engine.scaler
            # an fp16 overflow the dynamic scaler answered by lowering the scale: its normal work
            absorbed = (result.skipped and math.isfinite(result.loss) and scaler.dynamic
                        and scaler.loss_scale > scaler.min_scale)
            control.record_step(result.skipped, absorbed)
            history["losses"].append(result.loss)
            window_steps += 1
            if iteration % cfg.logging.log_interval == 0 or iteration in (1, iterations):
                self.metrics.log_train(iteration, consumed, result, time.perf_counter() - window_start, window_steps,
                                       skipped_total,
                                       loss_scale=engine.scaler.loss_scale if cfg.train.fp16 else None,
                                       per_domain=samples.named(samples.consumed_per_domain(consumed)))
                window_start, window_steps = time.perf_counter(), 0
            too_many = control.too_many_skipped() or (iteration == iterations and control.ended_inside_skipped_steps())
            if too_many:
                raise TrainingStopped(too_many)
            # decided before evaluating: a preempted job has seconds left, and spends them saving
            stop = control.should_stop(iteration)
            evaluating = not stop.preempted and (iteration % cfg.train.eval_interval == 0 or iteration == iterations)
            if validation and cfg.train.eval_iters > 0 and evaluating:
                losses = evaluate(cfg, engine, validation, self.dp_rank, self.dp_size)
                history["validation"].append(dict(iteration=iteration, **losses))
                self.metrics.log_eval(iteration, consumed, losses)
                window_start = time.perf_counter()
                # the same global losses on every rank: all raise together, before any save
                broken = {name: loss for name, loss in losses.items() if not math.isfinite(loss)}
                if broken:
                    names = ", ".join(f"lm loss validation{'' if n == 'all' else '/' + n} {v}"
                                      for n, v in broken.items())
                    raise TrainingStopped(f"validation loss is not finite at iteration {iteration} ({names}): the "
                                          "model diverged; no checkpoint was saved")
            if self.downstream is not None and evaluating:
                try:
                    scores = self.downstream.score(engine, self.dp_rank, self.dp_size)
                except DownstreamNotFinite as exc:
                    # as a NaN validation loss: every rank raises together, before any save
                    raise TrainingStopped(f"downstream evaluation at iteration {iteration}: {exc}: the model "
                                          "diverged; no checkpoint was saved") from None
                history.setdefault("downstream", []).append(dict(iteration=iteration, **scores))
                self.metrics.log_downstream(iteration, consumed, scores)
                window_start = time.perf_counter()
            periodic = cfg.checkpoint.save_interval and iteration % cfg.checkpoint.save_interval == 0
            due = periodic or owed or stop.save or iteration == iterations
            if cfg.checkpoint.save and due and last_saved != iteration:
                owed = self._unsaveable(iteration, stop)
                if not owed:
                    self.checkpoints.save(iteration, consumed, dict(kept, skipped_total=skipped_total,
                                                                    data_order=samples.state(consumed)))
                    last_saved = iteration
            if stop.stop:
                history["stopped"] = stop.reason
                _print0(f"stopping at iteration {iteration}: {stop.reason}")
                break

    def _unsaveable(self, iteration: int, stop) -> bool:
        """Whether the checkpoint of `iteration` must wait (a periodic save after a skipped
        iteration); raises TrainingStopped where it cannot wait (a stop) or the weights are broken.

        Every rank decides the same: the skipped-step count is global and the weight check reduces."""
        if self.control.last_step_skipped():
            skipped = (f"iteration {iteration} was skipped (inf/NaN loss or gradients): its weights are the ones "
                       f"that gave it, and are not saved")
            if stop.save:
                raise TrainingStopped(f"{stop.reason}, but {skipped}; {_newest_checkpoint(self.cfg)}")
            _print0(f"{skipped} yet; the checkpoint waits for the next iteration that is not skipped")
            return True
        if not weights_finite(self.engine):
            raise TrainingStopped(f"a weight is not finite after iteration {iteration} (an inf/NaN update): the "
                                  f"model diverged; no checkpoint was saved; {_newest_checkpoint(self.cfg)}")
        return False


def _newest_checkpoint(cfg: Config) -> str:
    try:
        newest = latest_iteration(cfg.checkpoint.save)
    except CheckpointError:
        newest = None
    if newest is None:
        return f"--save {cfg.checkpoint.save} holds no checkpoint"
    return f"the newest checkpoint is {checkpoint_dir(cfg.checkpoint.save, newest)}"


def weights_finite(engine: Engine) -> bool:
    """Whether every parameter of every rank is finite. Each rank checks its own shards on its
    device; one MIN all-reduce and one host read, once per save, not per step."""
    flags = [torch.isfinite(_local_shard(p)).all() for m in engine.modules for p in m.parameters()]
    ok = (torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=engine.device))
    ok = ok.to(torch.int32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _local_shard(param: torch.Tensor) -> torch.Tensor:
    # FSDP2 and tensor parallelism hold DTensors: this rank's shard, without communication
    return param.to_local() if isinstance(param, DTensor) else param
