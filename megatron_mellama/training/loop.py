"""The pretraining loop: the engine over the blended data, with logging, per-domain evaluation,
checkpoints that resume exactly, and run control (signals, exit limits, skipped steps).

The data position is `consumed_samples` with each domain's own count (`data/mixture.py`): a resumed
run reads exactly the samples an uninterrupted run would have read next, and a resumed run with
another blend continues every domain where it stopped.

One iteration: the engine's step, the run state's update (`run_state.py`), any fault injected for
testing (`fault_injection.py`), then the periodic jobs in order (`periodic.py`, `jobs/`: train log,
stopping, manual garbage collection, the replica check, validation, downstream scoring, checkpoint
saving); the loop ends at the last iteration or when the stop decision says stop.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist

from .. import kernels
from ..checkpoint.manager import CheckpointManager
from ..checkpoint.resume import checkpoint_to_load
from ..checkpoint.pretrained_start import resolve_start
from ..checkpoint.save_root import check_save_root
from ..checkpoint.trained_tokenizer import check_finetune_tokenizer
from ..config import Config
from ..data.datasets import build_datasets
from ..data.loader import train_batches
from ..evaluation.in_training import DownstreamTasks
from ..parallel.mesh import ParallelDims, init_distributed, local_device
from ..parallel.timeouts import configure_flight_recorder
from .bad_steps import BadSteps, RestartableBatches
from .console import print0
from .domain_loss import DomainLosses
from .engine import NONFINITE, Engine
from .fault_injection import FaultInjector, parse_faults
from .hang_watchdog import NoWatchdog, hang_watchdog
from .jobs.downstream import DownstreamScoring
from .jobs.manual_gc import ManualGC, collecting
from .jobs.replica_check import ReplicaCheck
from .jobs.saving import CheckpointSaving
from .jobs.stopping import Stopping
from .jobs.straggler_report import StragglerReport
from .jobs.train_log import TrainLog
from .jobs.validation import Validation, validation_sets
from .metrics import MetricsLogger
from .periodic import PeriodicJob, run_due_jobs
from .profiling import NoProfiling, profiling
from .run_control import RunControl
from .requeue_marker import UnfinishedMarker
from .run_state import RunState
from .stop_signals import StopSignals


def train_iterations(cfg: Config) -> int:
    if cfg.train.train_iters is not None:
        return cfg.train.train_iters
    return cfg.train.train_samples // cfg.train.global_batch_size


def train(cfg: Config, signals: StopSignals | None = None) -> dict:
    """Run (or resume) the job on this process's share of the layout; returns its history.

    `signals`: a stop-signal catcher installed earlier (`pretrain` installs one first thing)."""
    # a run that would write over checkpoints it does not continue, or read a checkpoint's weights
    # with another tokenizer, stops here, before any work
    faults = parse_faults(cfg.train.inject_fault)
    # under a SLURM chain: whether these flags resume, read before --pretrained-checkpoint sets --load
    unfinished = UnfinishedMarker(cfg, train_iterations(cfg))
    start = resolve_start(cfg)
    if start:
        print0(start)
    check_save_root(cfg)
    check_finetune_tokenizer(cfg)
    # Then, before minutes of start-up (process group, data index, a 70B checkpoint load): SIGUSR1
    # arriving meanwhile is kept, and acted on as soon as training could save; SIGTERM and SIGINT
    # end the process at once, even blocked in process-group set-up (`stop_signals.py`).
    control = RunControl(cfg, signals=signals)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        if world > 1:
            # torch reads the flight recorder's settings when the groups are created
            configure_flight_recorder(cfg.parallel.flight_recorder_trace_buffer_size,
                                      cfg.parallel.flight_recorder_dump_path)
            device = init_distributed(cfg.parallel.distributed_backend, cfg.parallel.distributed_timeout_minutes)
        else:
            device = local_device()
        control.device = device
        with collecting(cfg):
            history = _train(cfg, world, device, control, faults)
        unfinished.record(history, control.time_limit)
        return history
    finally:
        control.restore_handlers()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: Config, world: int, device: torch.device, control: RunControl, faults: list) -> dict:
    # the task files are checked (and tokenized) before any data, model or checkpoint work
    downstream = DownstreamTasks.from_config(cfg)
    dims = ParallelDims.from_config(cfg, world)
    meshes = dims.build_mesh(device.type) if world > 1 else None
    rank = dist.get_rank() if world > 1 else 0
    coords = dims.coordinates(rank)

    data = build_datasets(cfg)
    for line in data.notes:
        print0(line)
    # a checkpoint to load provides every weight (a load that lacks one fails): no random values
    # are generated only to be overwritten (minutes at 70B)
    ckpt = checkpoint_to_load(cfg)
    engine = Engine(cfg, meshes, device, initialise=ckpt is None)
    print0("kernels: " + ", ".join(f"{op} {backend}" for op, backend in kernels.selected().items()))
    checkpoints = CheckpointManager(cfg, engine)
    # the directory found above: should `latest` move meanwhile, this still loads (or fails), and
    # never leaves the uninitialised engine as it is
    state = checkpoints.load(ckpt) or {}
    iteration = state.get("iteration", 0)
    consumed = state.get("consumed_samples", 0)
    samples = data.train
    if iteration:
        print0(f"resumed from {cfg.checkpoint.load} at iteration {iteration}, consumed samples {consumed}")
        # each domain continues its own order where the checkpoint left it, whatever the blend now
        samples, changes = samples.continued(state.get("data_order"), consumed)
        for line in changes:
            print0(line)

    if cfg.logging.log_loss_per_domain:
        engine.domain_losses = DomainLosses.for_run(engine, samples, coords["tp"])
    run = RunState.starting_at(iteration, consumed, iterations=train_iterations(cfg),
                               skipped_total=state.get("skipped_total", 0), kernels=kernels.selected())
    metrics = MetricsLogger(cfg, rank, world, device, wandb_run_id=state.get("wandb_run_id"))
    try:
        if run.iteration >= run.iterations:
            # as Megatron-LM, exit 0 (a requeued job that had finished is no failure), but say so
            unit = (f"--train-iters {cfg.train.train_iters}" if cfg.train.train_iters is not None else
                    f"--train-samples {cfg.train.train_samples} ({run.iterations} iterations)")
            run.stopped = (f"the run is already complete at iteration {iteration} (checkpoint in --load "
                           f"{cfg.checkpoint.load}; {unit}): nothing to train, nothing saved")
            print0(run.stopped)
            return run.history()
        if control.preempted():
            # nothing was trained since the checkpoint this run started from: nothing to save
            run.stopped = "a stop signal arrived during start-up"
            print0(f"stopping before the first iteration: {run.stopped}")
            return run.history()
        # a rollback restarts the batches at its checkpoint's position
        batches = RestartableBatches(lambda at: train_batches(cfg, samples, consumed_samples=at, dp_rank=coords["dp"],
                                                              dp_size=dims.dp), consumed)
        try:
            # what a checkpoint keeps besides the data position: an SFT run's chat template, for the export
            kept = dict(chat_template=data.chat_template) if data.chat_template is not None else {}
            kept.update(metrics.checkpoint_extra())  # the W&B run id, which a resumed run continues
            jobs = periodic_jobs(cfg, engine, metrics, control, checkpoints, samples, validation_sets(data),
                                 downstream, coords["dp"], dims.dp, kept, dims)
            bad = BadSteps(cfg, state, kept, checkpoints, metrics)
            with hang_watchdog(cfg, rank, world, device) as watchdog, \
                    profiling(cfg, rank, world, device) as profiler:  # --distributed-timeout-seconds-after-init
                _run_steps(run, engine, batches, control, jobs, FaultInjector(faults, rank, world), bad, watchdog,
                           profiler)
        finally:
            batches.close()
    finally:
        checkpoints.close()
        metrics.close()
    return run.history()


def periodic_jobs(cfg: Config, engine: Engine, metrics: MetricsLogger, control: RunControl, checkpoints,
                  samples, validation: dict, downstream: DownstreamTasks | None, dp_rank: int, dp_size: int,
                  kept: dict, dims: ParallelDims) -> list[PeriodicJob]:
    """The duties after each iteration, in the order they run (see `periodic.py`)."""
    evaluations = [Validation(cfg, engine, metrics, validation, dp_rank, dp_size),
                   DownstreamScoring(cfg, engine, metrics, downstream, dp_rank, dp_size)]
    saving = CheckpointSaving(cfg, engine, checkpoints, control, samples, kept)
    return [
        train_log := TrainLog(cfg, metrics, engine, samples),
        StragglerReport(cfg, engine, metrics, train_log),  # at the train log's iterations, one all-gather
        Stopping(control),
        # after the stop decision, which the collection's due reads (a stop saves)
        ManualGC(cfg, before=evaluations + [saving]),
        # before the evaluations too: a corrupted replica's scores are not the model's, and a run
        # that must stop should not first spend an evaluation's minutes
        ReplicaCheck(cfg, engine, dims, saving),
        *evaluations,
        saving,
    ]


def _run_steps(run: RunState, engine: Engine, batches, control: RunControl, jobs: list[PeriodicJob],
               faults: FaultInjector, bad: BadSteps, watchdog=NoWatchdog(), profiler=NoProfiling()) -> None:
    """The iterations of one run, from where it (re)started: a step, then the due jobs. After a
    rollback (`bad_steps.py`) the loop goes on from the checkpoint's iteration."""
    run.restart_window()
    while run.iteration < run.iterations:
        watchdog.entered(run.iteration + 1)
        profiler.step(run.iteration + 1)
        if _step(run, engine, batches, control, bad, faults):
            continue
        faults.after_step(run.iteration, engine)
        run_due_jobs(jobs, run, before=watchdog.job)
        if run.stop.stop:
            run.stopped = run.stop.reason
            print0(f"stopping at iteration {run.iteration}: {run.stop.reason}")
            break


def _step(run: RunState, engine: Engine, batches, control: RunControl, bad: BadSteps,
          faults: FaultInjector) -> bool:
    """One iteration's step; True when it rolled the run back to a checkpoint instead."""
    iteration = run.iteration + 1
    with engine.timers("data-wait"):
        micro_batches = next(batches)
    if bad.skips(iteration):
        # --iterations-to-skip: the batch is read and not trained on; nothing failed, nothing counts
        result = bad.skipped(iteration, engine)
    else:
        faults.before_step(iteration, engine)
        result = engine.step(micro_batches, judge=bad.judge)
        if bad.after_step(run, iteration, result, batches, control):
            return True
        run.skipped_total += int(result.skipped)
        scaler = engine.scaler
        # an fp16 overflow the dynamic scaler answered by lowering the scale: its normal work
        absorbed = (result.why == NONFINITE and math.isfinite(result.loss) and scaler.dynamic
                    and scaler.loss_scale > scaler.min_scale)
        control.record_step(result.skipped, absorbed)
    run.step = result
    run.iteration = iteration
    run.consumed_samples = batches.consumed_samples
    run.losses.append(result.loss)
    run.window_steps += 1
    return False
