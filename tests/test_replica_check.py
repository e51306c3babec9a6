"""Corrupted replicas: a weight checksum compared across the ranks that hold the same weights stops
the run before a corrupted checkpoint is saved; the bit-flip injector that tests it; --manual-gc."""

import contextlib
import gc
import io
import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from engine_harness import RANK_PRELOAD, store_address
from megatron_mellama.config import ConfigError, parse_config
from megatron_mellama.parallel.mesh import ParallelDims
from megatron_mellama.pretrain import main
from megatron_mellama.training import loop
from megatron_mellama.training.fault_injection import Fault, FaultInjector, flip_bit, parse_faults
from megatron_mellama.training.jobs.replica_check import describe, mismatches, replica_groups, weights_checksum

RUN = ["--model", "tiny", "--mock-data", "--vocab-size", "128", "--seq-length", "16", "--num-layers", "2",
       "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "0", "--num-workers", "0",
       "--log-interval", "1"]
FLAG = "--check-weight-hash-across-dp-replicas-interval"


# -- the groups and the checksum -------------------------------------------------------------------
@pytest.mark.parametrize("world, flags, groups", [
    (2, [], [[0, 1]]),  # DDP: both ranks hold the whole model
    (4, ["--tensor-model-parallel-size", "2"], [[0, 2], [1, 3]]),  # TP ranks hold different tensors
    (4, ["--pipeline-model-parallel-size", "2"], [[0, 1], [2, 3]]),
    (4, ["--context-parallel-size", "2"], [[0, 1, 2, 3]]),  # CP ranks are replicas too
    (4, ["--data-parallel-sharding", "optimizer"], [[0], [1], [2], [3]]),  # one shard each: no copies
    (4, ["--data-parallel-sharding", "full", "--data-parallel-replicate-size", "2"], [[0, 2], [1, 3]]),
    (4, ["--data-parallel-sharding", "full", "--context-parallel-size", "2"], [[0], [1], [2], [3]]),
    (8, ["--data-parallel-sharding", "full", "--data-parallel-replicate-size", "2", "--context-parallel-size", "2"],
     [[0, 4], [1, 5], [2, 6], [3, 7]]),
])
def test_replica_groups_hold_the_same_share(world, flags, groups):
    cfg = parse_config(RUN + ["--global-batch-size", "16"] + flags, world_size=world)
    assert replica_groups(ParallelDims.from_config(cfg, world), cfg.parallel.data_parallel_sharding) == groups


def test_the_odd_rank_out_is_named_and_two_replicas_are_both_named():
    groups = [[0, 2, 4], [1, 3]]
    sums = {0: (1, 2), 2: (1, 2), 4: (9, 2), 1: (5, 5), 3: (5, 5)}
    assert mismatches([sums[r] for r in range(5)], groups) == [([4], [0, 2])]
    sums[3] = (5, 6)
    found = mismatches([sums[r] for r in range(5)], groups)
    assert found == [([4], [0, 2]), ([1, 3], [])]
    assert describe(found, [f"node{r // 2}" for r in range(5)]) == (
        "rank 4 (node2) differs from rank 0 (node0) and rank 2 (node1); "
        "rank 1 (node0) and rank 3 (node1) disagree, with no majority to tell which is right")


class _Engine:
    def __init__(self, dtype):
        torch.manual_seed(0)
        self.modules = [nn.Linear(4, 3).to(dtype), nn.Linear(3, 2).to(dtype)]
        self.device = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_flipped_bit_changes_the_weight_and_the_checksum(dtype):
    engine = _Engine(dtype)
    before, value = weights_checksum(engine.modules, engine.device), engine.modules[0].weight[0, 0].item()
    flip_bit(engine)
    after = engine.modules[0].weight[0, 0].item()
    assert after != value and 0.2 < abs(after / value) < 5  # a mantissa bit: the same order of magnitude
    assert not torch.equal(before, weights_checksum(engine.modules, engine.device))
    flip_bit(engine)
    assert torch.equal(before, weights_checksum(engine.modules, engine.device))
    # two values swapped keep the plain sum: the position-weighted one sees it
    with torch.no_grad():
        w = engine.modules[1].weight.view(-1)
        w[0], w[1] = w[1].clone(), w[0].clone()
    assert weights_checksum(engine.modules, engine.device)[0] == before[0]
    assert not torch.equal(before, weights_checksum(engine.modules, engine.device))


# -- the fault flag -----------------------------------------------------------------------------------
def test_fault_specs():
    assert parse_faults(["bitflip@3:1", "bitflip@7"]) == [Fault("bitflip", 3, 1), Fault("bitflip", 7, 0)]
    injector = FaultInjector(parse_faults(["bitflip@3:1"]), rank=0, world=2)
    engine = _Engine(torch.float32)
    before = weights_checksum(engine.modules, engine.device)
    injector.after_step(3, engine)  # rank 1's fault: nothing here
    assert torch.equal(before, weights_checksum(engine.modules, engine.device))
    with pytest.raises(ConfigError, match="--inject-fault bitflip@3:2: there are only 2 ranks"):
        FaultInjector(parse_faults(["bitflip@3:2"]), rank=0, world=2)


@pytest.mark.parametrize("spec, want", [
    ("freeze@3", "--inject-fault 'freeze@3': unknown kind 'freeze'; supported: bitflip, crash, hang, loss-spike, "
                 "nan, nan-transient, slow"),
    ("bitflip3", "--inject-fault 'bitflip3': expected KIND@ITERATION[:RANK], e.g. bitflip@3:1"),
    ("bitflip@0", "--inject-fault 'bitflip@0': the iteration must be 1 or more"),
])
def test_a_bad_fault_is_one_line_naming_the_flag(spec, want, tmp_path, capsys):
    assert main(RUN + ["--train-iters", "1", "--save", str(tmp_path / "ckpt"), "--inject-fault", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(want), err
    assert not (tmp_path / "ckpt").exists() or not os.listdir(tmp_path / "ckpt")


def test_interval_must_be_positive():
    with pytest.raises(ConfigError, match=f"{FLAG} must be positive, got 0"):
        parse_config(RUN + [FLAG, "0"])
    with pytest.raises(ConfigError, match="--manual-gc-interval must not be negative"):
        parse_config(RUN + ["--manual-gc-interval", "-1"])


# -- real runs in gloo processes ------------------------------------------------------------------------
def _pretrain_rank(rank, world, store, out_dir, argv, env):
    os.environ.clear()
    os.environ.update(env, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    err, out = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(argv)  # training destroys the process group as it ends
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(dict(rc=rc, err=err.getvalue(), out=out.getvalue(), seconds=time.perf_counter() - start), f)


def _pretrain(argv, world, out_dir) -> list[dict]:
    """`pretrain` in `world` gloo processes; each rank's exit code, stderr, stdout and run time."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(RANK_PRELOAD)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    os.makedirs(out_dir, exist_ok=True)
    mp.start_processes(_pretrain_rank, args=(world, store_address(), out_dir, argv, env), nprocs=world,
                       start_method="forkserver")
    results = []
    for r in range(world):
        with open(os.path.join(out_dir, f"rank{r}.json")) as f:
            results.append(json.load(f))
    return results


def _iterations(root) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith("iter_")) if os.path.isdir(root) else []


@pytest.mark.slow
def test_a_flipped_bit_stops_the_run_before_the_save(tmp_path):
    argv = RUN + ["--train-iters", "4", "--save-interval", "2", FLAG, "2"]
    bad = tmp_path / "bad"
    ranks = _pretrain(argv + ["--save", str(bad), "--inject-fault", "bitflip@3:1"], 2, str(tmp_path / "bad-out"))
    assert [r["rc"] for r in ranks] == [1, 1]
    lines = [line for line in ranks[0]["err"].splitlines() if ": stopped: " in line]
    assert len(lines) == 1 and "after iteration 4" in lines[0] and FLAG in lines[0], lines
    assert "rank 0 (" in lines[0] and "rank 1 (" in lines[0], lines
    assert _iterations(bad) == ["iter_0000002"]  # no checkpoint of iteration 4 was published
    assert (bad / "latest").read_text().strip() == "2"

    good = tmp_path / "good"
    ranks = _pretrain(argv + ["--save", str(good)], 2, str(tmp_path / "good-out"))
    assert [r["rc"] for r in ranks] == [0, 0], ranks[0]["err"][-2000:]
    assert _iterations(good) == ["iter_0000002", "iter_0000004"]


@pytest.mark.slow
def test_tensor_parallel_ranks_are_not_compared_with_each_other(tmp_path):
    # TP2 x DP2: the two TP shards differ, each is compared with its DP replica only, at every
    # iteration: iteration 1 passes its check (no false alarm between TP shards); a bit flipped on
    # rank 3 after iteration 2 names it and its replica, rank 1, not the other TP rank's group
    argv = RUN + ["--train-iters", "3", "--tensor-model-parallel-size", "2", FLAG, "1"]
    ranks = _pretrain(argv + ["--inject-fault", "bitflip@2:3"], 4, str(tmp_path / "flipped"))
    assert [r["rc"] for r in ranks] == [1, 1, 1, 1], ranks[0]["err"][-2000:]
    line = next(line for line in ranks[2]["err"].splitlines() if ": stopped: " in line)
    print(line)
    assert "after iteration 2" in line and "rank 1 (" in line and "rank 3 (" in line, line
    assert "rank 0 (" not in line and "rank 2 (" not in line, line


# -- manual garbage collection ------------------------------------------------------------------------
def test_manual_gc_collects_at_the_interval_only_and_restores_the_collector(monkeypatch):
    seen = []

    def count(phase, info):
        if phase == "start":
            seen.append((gc.isenabled(), info["generation"]))

    real_step = loop._step

    def step(run, *args):
        seen.append(("iteration", run.iteration + 1))
        real_step(run, *args)

    monkeypatch.setattr(loop, "_step", step)
    assert gc.isenabled()
    gc.callbacks.append(count)
    try:
        loop.train(parse_config(RUN + ["--train-iters", "5", "--manual-gc", "--manual-gc-interval", "2"]))
    finally:
        gc.callbacks.remove(count)
    assert gc.isenabled()
    # from the collection that starts training (before it, start-up's automatic ones may run)
    seen = seen[seen.index((False, 2)):]
    collections = [e for e in seen if e[0] != "iteration"]
    assert collections and all(e == (False, 2) for e in collections)  # only full collections, automatic GC off
    # one at the start, then after iterations 2 and 4 (before 3 and 5 start)
    order = [e[1] if e[0] == "iteration" else "gc" for e in seen]
    assert order == ["gc", 1, 2, "gc", 3, 4, "gc", 5]
