"""--timing-log-level and --timing-log-option: which timers each level prints (none at 0), their
line, TensorBoard tags and JSON record, and the max / minmax / all reductions over gloo ranks."""

import itertools
import json
import time

import pytest

from engine_harness import spawn_gloo
from megatron_mellama.pretrain import load_run_config
from megatron_mellama.tools.run_logs import read_run
from megatron_mellama.training.loop import train
from megatron_mellama.training.timers import Timers

RUN = ["--model", "tiny", "--mock-data", "--vocab-size", "256", "--seq-length", "32", "--micro-batch-size", "2",
       "--global-batch-size", "4", "--lr", "3e-3", "--lr-warmup-iters", "1", "--eval-iters", "1",
       "--eval-interval", "2", "--log-interval", "2", "--num-workers", "0", "--train-iters", "4"]
LEVEL_1 = ["data-wait", "forward-backward", "optimizer", "save-checkpoint", "evaluation"]


def _timer_lines(out: str) -> list[str]:
    lines = out.splitlines()
    starts = [i for i, line in enumerate(lines) if "time across ranks (ms):" in line]
    return [lines[i:i + 1] + list(itertools.takewhile(lambda line: line.startswith("    "), lines[i + 1:]))
            for i in starts]


def _names(block: list[str]) -> list[str]:
    return [line.strip().split(" ", 1)[0] for line in block[1:]]


@pytest.mark.slow
def test_level_2_prints_every_timer_and_level_0_none(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    train(load_run_config(RUN + ["--timing-log-level", "2", "--log-file", str(log), "--save", str(tmp_path / "ckpt"),
                                 "--save-interval", "2"]))
    blocks = _timer_lines(capsys.readouterr().out)
    assert len(blocks) == 3  # the logs at iterations 1, 2 and 4
    for block in blocks:
        assert block[0].strip() == "(min, max) time across ranks (ms):"  # minmax is the default
        assert _names(block) == ["data-wait", "forward-backward", "grads-clip", "optimizer", "save-checkpoint",
                                 "evaluation"]
        assert all(" ...." in line for line in block[1:])  # Megatron-LM's dotted column
    records = [r["timers"] for r in map(json.loads, log.read_text().splitlines()) if "timers" in r]
    assert len(records) == 3
    # the save and the evaluation at iteration 2 show in the window of the log at 4
    assert records[2]["save-checkpoint"]["max"] > 0 and records[2]["evaluation"]["max"] > 0
    assert records[0]["save-checkpoint"]["max"] == 0 and records[1]["forward-backward"]["max"] > 0
    assert all(t["min"] == t["max"] for t in records[2].values())  # one rank
    tags = read_run(str(log)).metrics
    assert tags["forward-backward-time"][4] == records[2]["forward-backward"]["max"]

    train(load_run_config(RUN + ["--train-iters", "2"]))
    assert _timer_lines(capsys.readouterr().out) == []


def test_levels_choose_the_timers():
    assert Timers(0, "max", "cpu").names == []
    assert Timers(0, "max", "cpu").report(5) is None
    assert Timers(1, "max", "cpu").names == LEVEL_1
    assert "grads-clip" in Timers(2, "max", "cpu").names


def test_times_are_per_iteration_of_the_window(capsys):
    timers = Timers(1, "max", "cpu")
    for _ in range(2):
        with timers("forward-backward"):
            time.sleep(0.02)
        with timers("grads-clip"):  # a level-2 timer at level 1: not timed
            time.sleep(0.01)
    record, line, scalars = timers.report(steps=2)
    assert set(record) == set(LEVEL_1)
    assert 0.02 <= record["forward-backward"]["max"] < 0.2
    assert line.splitlines()[0] == "max time across ranks (ms):"
    assert scalars["forward-backward-time"] == record["forward-backward"]["max"]
    assert timers.report(steps=1)[0]["forward-backward"]["max"] == 0  # a new window


def _rank_timers(rank: int, world: int) -> dict:
    out = {}
    for option in ("max", "minmax", "all"):
        timers = Timers(1, option, "cpu")
        with timers("optimizer"):
            time.sleep(0.01 + 0.05 * rank)
        out[option] = timers.report(steps=1)[0]["optimizer"]
    return out


@pytest.mark.slow
def test_options_over_two_ranks(tmp_path):
    ranks = spawn_gloo(_rank_timers, 2, (), str(tmp_path))
    for got in ranks:  # every rank has the reduced values
        assert got["max"]["max"] >= 0.06 and "min" not in got["max"]
        assert 0.01 <= got["minmax"]["min"] < 0.05 <= got["minmax"]["max"]
        fast, slow = got["all"]["ranks"]
        assert 0.01 <= fast < 0.05 <= slow
