"""--profile: a tiny run writes a Chrome trace of the chosen iterations only (parsed here: the model's
ops and the ProfilerStep#N markers of those iterations); --record-memory-history is CUDA-only and
says so in one line on the CPU."""

import glob
import json
import os
import re

import pytest
import torch

from megatron_mellama.config import ConfigError, parse_config
from megatron_mellama.pretrain import main
from megatron_mellama.training.profiling import StepProfiler, profile_dir, snapshot_path

RUN = ["--model", "tiny", "--mock-data", "--vocab-size", "128", "--seq-length", "16", "--num-layers", "2",
       "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "0", "--num-workers", "0",
       "--log-interval", "1", "--train-iters", "5"]


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("profile")
    assert main(RUN + ["--profile", "--profile-step-start", "2", "--profile-step-end", "3",
                       "--profile-dir", str(root / "traces"), "--record-memory-history"]) == 0
    traces = glob.glob(str(root / "traces" / "rank0.*.pt.trace.json"))
    assert len(traces) == 1, traces
    with open(traces[0]) as fh:
        return json.load(fh)


def test_the_trace_holds_the_chosen_iterations_and_no_other(profiled):
    names = {event.get("name") for event in profiled["traceEvents"]}
    steps = sorted(n for n in names if n and n.startswith("ProfilerStep#"))
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"]
    assert names & {"aten::mm", "aten::linear", "aten::addmm"}  # the model's matrix products
    assert "aten::embedding" in names or "aten::index_select" in names
    # every operator ran inside those two iterations: none of iteration 1 or 4 was traced
    markers = [e for e in profiled["traceEvents"] if str(e.get("name")).startswith("ProfilerStep#")]
    begin, end = min(e["ts"] for e in markers), max(e["ts"] + e["dur"] for e in markers)
    ops = [e for e in profiled["traceEvents"] if e.get("cat") == "cpu_op"]
    assert ops and all(begin <= e["ts"] and e["ts"] + e["dur"] <= end for e in ops)


def test_the_trace_records_shapes_and_memory(profiled):
    events = profiled["traceEvents"]
    assert any(e.get("args", {}).get("Input Dims") for e in events if e.get("name") == "aten::mm")
    assert any(e.get("name") == "[memory]" for e in events)


def test_memory_history_is_skipped_on_the_cpu_with_one_line(tmp_path, capsys):
    assert main(RUN + ["--train-iters", "1", "--record-memory-history",
                       "--memory-snapshot-path", str(tmp_path / "snapshot.pickle")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "--record-memory-history" in line]
    assert lines == ["rank 0: --record-memory-history records CUDA allocations only: skipped on cpu"]
    assert not os.listdir(tmp_path)


def test_only_the_chosen_ranks_trace(tmp_path):
    cfg = parse_config(RUN + ["--profile", "--profile-ranks", "1", "3", "--profile-dir", str(tmp_path),
                              "--global-batch-size", "8"], world_size=4)
    assert [StepProfiler(cfg, rank, torch.device("cpu")).enabled for rank in range(4)] == [False, True, False, True]
    assert not StepProfiler(parse_config(RUN), 0, torch.device("cpu")).enabled


def test_where_the_traces_and_snapshots_go(tmp_path):
    assert profile_dir(parse_config(RUN + ["--profile"])) == "profile"
    assert profile_dir(parse_config(RUN + ["--profile", "--save", "ck"])) == os.path.join("ck", "profile")
    assert profile_dir(parse_config(RUN + ["--profile", "--save", "ck", "--tensorboard-dir", "tb"])) == "tb"
    assert profile_dir(parse_config(RUN + ["--profile", "--tensorboard-dir", "tb", "--profile-dir", "p"])) == "p"
    assert snapshot_path("mem/snap.pickle", 0, 1) == "mem/snap.pickle"
    assert snapshot_path("mem/snap.pickle", 3, 8) == "mem/snap.rank3.pickle"


@pytest.mark.parametrize("flags, message", [
    (["--profile-step-start", "0"], "--profile-step-start must be 1 or more"),
    (["--profile-step-start", "5", "--profile-step-end", "4"], "--profile-step-end 4 comes before"),
    (["--profile-ranks", "x"], "--profile-ranks x"),
    (["--profile-ranks", "0", "1"], "--profile-ranks 1: expected global rank numbers, 0 to 0 in this job of 1"),
    (["--wandb-exp-name", "a"], "--wandb-exp-name needs --wandb-project"),
])
def test_bad_profile_and_wandb_flags_are_refused(flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(RUN + flags)


def test_a_resumed_run_marks_its_own_iteration_numbers(tmp_path):
    """A launch resumed at iteration 6 that traces 6-8: ProfilerStep#7 and #8 (the 7th and 8th
    iterations), not torch's count of the launch's steps."""
    cfg = parse_config(RUN + ["--profile", "--profile-step-start", "6", "--profile-step-end", "8",
                              "--profile-dir", str(tmp_path)])
    profiler = StepProfiler(cfg, 0, torch.device("cpu"))
    for iteration in range(7, 11):
        profiler.step(iteration)
        torch.ones(4, 4) @ torch.ones(4, 4)
    (trace,) = glob.glob(str(tmp_path / "rank0.*.pt.trace.json"))
    with open(trace) as fh:
        names = {event.get("name") for event in json.load(fh)["traceEvents"]}
    assert sorted(n for n in names if n and n.startswith("ProfilerStep#")) == ["ProfilerStep#7", "ProfilerStep#8"]
    assert "aten::mm" in names
