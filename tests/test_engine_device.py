"""What CPU tests can show of the GPU path: every step scalar is made on the run's device (NCCL
reduces only device tensors), and a step reads the device a constant number of times, however many
micro-batches it has.

Two probes stand in for a GPU. Under `torch.set_default_device("meta")`, any tensor created
without naming the run's device lands on "meta" and the step fails, as it would on a GPU when that
tensor reached an NCCL collective or met a CUDA tensor. A TorchFunctionMode counts the calls that
synchronise a GPU with the host (`.item()`, `.tolist()`, `bool(t)`, `float(t)`, `nonzero`,
`.cpu()`, ...) made from this project's code during a step.
"""

import sys

import pytest
import torch
from engine_harness import TINY, global_batches, micro_batches_of, rank_engine, reference, spawn_gloo
from torch.overrides import TorchFunctionMode

T = torch.Tensor
HOST_SYNCS = {T.item, T.tolist, T.__bool__, T.__float__, T.__int__, T.__index__, T.nonzero, torch.nonzero,
              T.cpu, T.numpy, torch.masked_select, T.masked_select, torch.unique, T.unique}
PROJECT = "megatron_mellama"


class HostSyncs(TorchFunctionMode):
    """Records (function, file:line) of each host-synchronising call made by the project's own code.

    Calls inside torch are not counted: on a GPU most of them read CPU tensors (AdamW's step
    counters), which costs no synchronisation."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_SYNCS:
            caller = sys._getframe(1).f_code.co_filename
            if PROJECT in caller:
                where = caller.split(PROJECT)[-1].lstrip("/\\")
                self.calls.append((func.__name__, f"{where}:{sys._getframe(1).f_lineno}"))
        return func(*args, **(kwargs or {}))


def _probed_steps(cfg, engine, dp_rank: int, dp_size: int) -> dict:
    batches = global_batches(cfg, 3)
    losses = [engine.step(micro_batches_of(batches[0], cfg, dp_rank, dp_size)).loss]  # lazy set-up outside
    syncs = []
    for batch in batches[1:]:
        with HostSyncs() as probe:
            torch.set_default_device("meta")
            try:
                losses.append(engine.step(micro_batches_of(batch, cfg, dp_rank, dp_size)).loss)
            finally:
                torch.set_default_device(None)
        syncs.append(probe.calls)
    return dict(losses=losses, syncs=syncs)


def _rank(rank, world, argv):
    cfg, engine, coords, dp_size = rank_engine(rank, world, argv)
    return _probed_steps(cfg, engine, coords["dp"], dp_size)


# 16 sequences in micro-batches of 2: 8, 4 or 2 micro-batches per rank per step, depending on DP
ARGV = TINY + ["--global-batch-size", "16"]


def _check(results: list[dict], micro_batches: int) -> None:
    want = reference(ARGV, 3)["losses"]
    for r in results:
        for got, ref in zip(r["losses"], want):
            assert abs(got - ref) <= 1e-5 * abs(ref)
        for calls in r["syncs"]:
            # one read of (loss, grad norm) per step; with per-micro-batch reads there would be >= 2 more
            assert len(calls) <= 1 < micro_batches, calls


@pytest.mark.slow
def test_one_process_step_syncs_once_and_makes_nothing_off_device():
    from megatron_mellama.config import parse_config
    from megatron_mellama.training.engine import Engine

    cfg = parse_config(ARGV)
    _check([_probed_steps(cfg, Engine(cfg), 0, 1)], micro_batches=8)


@pytest.mark.slow
@pytest.mark.parametrize("layout, world, micro_batches", [
    (["--data-parallel-sharding", "optimizer"], 2, 4),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "2"], 4, 8),
], ids=["dp2-zero2", "tp2-sp-pp2"])
def test_parallel_step_syncs_once_and_makes_nothing_off_device(tmp_path, layout, world, micro_batches):
    _check(spawn_gloo(_rank, world, (ARGV + layout,), str(tmp_path)), micro_batches)


class DispatchSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts, at the dispatcher, every operation that makes the host wait for a device's value,
    whoever calls it (the project, torch's optimizer, FSDP): the figure a GPU would pay per step."""

    OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero",
           "item", "allclose"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_dispatcher_level_host_syncs_per_step_do_not_grow_with_micro_batches():
    from megatron_mellama.config import parse_config
    from megatron_mellama.training.engine import Engine

    with DispatchSyncs() as probe:  # the probe sees a read of a tensor's value, and a nonzero
        torch.ones(()).item()
        torch.ones(3).nonzero()
    assert probe.count == 2
    counts = {}
    for micro in (8, 2):  # 16 sequences in micro-batches of 2, then of 8
        cfg = parse_config(TINY + ["--global-batch-size", "16", "--micro-batch-size", str(16 // micro)])
        engine = Engine(cfg)
        batches = global_batches(cfg, 2)
        engine.step(micro_batches_of(batches[0], cfg, 0, 1))  # lazy set-up outside
        with DispatchSyncs() as probe:
            engine.step(micro_batches_of(batches[1], cfg, 0, 1))
        counts[micro] = probe.count
    # on the CPU `.tolist()` (the step's one read) bypasses the dispatcher: what is counted here is
    # every other read, from any caller, and there is none
    assert counts[8] == counts[2] <= 8, counts
