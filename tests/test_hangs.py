"""Hangs (`--distributed-timeout-seconds-after-init`): a hung, frozen or crashed rank is named, every
live rank writes its stacks under `<--save>/debug/`, the job ends within the timeout plus a small
margin, and torchrun's restart resumes exactly; the fault kinds hang, crash and slow."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from megatron_mellama.parallel.timeouts import CollectiveTimeouts
from megatron_mellama.training import fault_injection
from megatron_mellama.training.fault_injection import Fault, parse_faults
from megatron_mellama.training.hang_watchdog import HangWatchdog, job_name, not_arrived
from megatron_mellama.training.jobs.saving import CheckpointSaving
from megatron_mellama.training.jobs.stopping import Stopping
from trainer_processes import finish, trainer_pid

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "torchrun_single_node.sh"
TINY = ["--model", "tiny", "--num-layers", "2", "--mock-data", "--vocab-size", "256", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--eval-iters", "1",
        "--eval-interval", "100000", "--log-interval", "1", "--num-workers", "0"]
S = 5  # --distributed-timeout-seconds-after-init in the process tests
ITERS, SAVE_INTERVAL = 16, 3
needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc to find the trainers")


# --- which ranks did not arrive: the decision, on records made up here ---------------------------

def _record(entries, phase_index=0, phase="step", age=0.0, now=1000.0, host="node0"):
    return dict(entries=entries, iteration=entries + 10, phase_index=phase_index, phase=phase, time=now - age,
                since=now - age - 1.0, host=host, device="cuda:0", pid=1)


def test_the_ranks_that_did_not_arrive_are_the_stale_the_behind_and_the_silent():
    now, stale = 1000.0, 3.0
    # everyone in the same collective, alive: nobody to name
    same = {0: _record(7, 2, "stopping"), 1: _record(7, 2, "stopping", age=2.9)}
    assert not_arrived(same, now, stale) == []
    records = {0: _record(7, 2, "stopping"), 1: _record(7, 0, "step", host="node1"),  # behind: still in its step
               2: _record(7, 2, "stopping", age=6.0, host="node2"),  # frozen where the others are
               3: None,  # never published
               4: _record(6, 3, "checkpoint saving")}  # a whole iteration behind
    late = dict(not_arrived(records, now, stale))
    assert sorted(late) == [1, 2, 3, 4]
    assert "node1" in late[1] and "iteration 17, step" in late[1] and "behind the others (iteration 17, stopping)" \
        in late[1]
    assert late[2] == "node2, cuda:0: last heard of 6.0 s ago, at iteration 17, stopping: a frozen or dead process"
    assert late[3].startswith("no record")
    # a stale record is not the front: ranks waiting behind a dead one that had gone further are not named
    ahead_dead = {0: _record(5, 1, "stopping"), 1: _record(6, 0, age=10.0)}
    assert [rank for rank, _ in not_arrived(ahead_dead, now, stale)] == [1]
    assert job_name(CheckpointSaving.__new__(CheckpointSaving)) == "checkpoint saving"


# --- the watchdog in this process, on a store of its own ------------------------------------------

def _watchdog(tmp_path, seconds, world=2):
    store = dist.HashStore()
    exits = []
    watchdog = HangWatchdog(seconds, job_minutes=1.0, rank=0, world=world, device="cpu",
                            debug_root=str(tmp_path / "debug"), store=lambda timeout: store, exit=exits.append)
    return watchdog, store, exits


def _wait_for(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_the_watchdog_names_a_silent_rank_writes_the_stacks_and_exits(tmp_path, capsys):
    watchdog, store, exits = _watchdog(tmp_path, seconds=0.6)
    # rank 1 published once, at iteration 1, and was not heard of since: frozen
    store.set("rank1", json.dumps(dict(_record(1, now=time.time()), iteration=1, host="node1")))
    with watchdog:
        watchdog.entered(1)
        watchdog.entered(2)  # after the first step the limit is S
        started = time.monotonic()
        assert _wait_for(lambda: exits, 5), "the watchdog did not fire"
        took = time.monotonic() - started
    assert exits == [1] and 0.6 <= took < 1.5, took
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("hang watchdog, rank 0 ") and "did not arrive: rank 1 (node1, cuda:0: last heard of" in line
    assert "s ago, at iteration 1, step: a frozen or dead process" in line
    report = (tmp_path / "debug" / "hang-iteration2" / "rank0.txt").read_text()
    assert "no progress for 0.6 s at iteration 2, step" in report
    # the main thread's stack shows where it was: this test, waiting
    assert "in _wait_for" in report and "in test_the_watchdog_names_a_silent_rank" in report
    assert json.loads(store.get("rank0"))["iteration"] == 2  # it published its own record


def test_the_first_step_and_long_jobs_have_the_long_limit(tmp_path):
    watchdog, store, exits = _watchdog(tmp_path, seconds=0.4, world=1)
    with watchdog:
        watchdog.entered(1)  # the first step of a launch: warm-up, compilation
        time.sleep(0.8)
        watchdog.entered(2)
        watchdog.job(Stopping.__new__(Stopping))  # a short job keeps S
        watchdog.job(CheckpointSaving.__new__(CheckpointSaving))  # a save may take minutes
        time.sleep(0.8)
        assert exits == []
        watchdog.entered(3)
        assert _wait_for(lambda: exits, 5)
    report = (tmp_path / "debug" / "hang-iteration3" / "rank0.txt").read_text()
    assert "at iteration 3, step" in report and "every rank is at the same place" in report


def test_every_process_group_gets_the_short_timeout_and_back(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            timeout=timedelta(minutes=1))
    try:
        sub = dist.new_group([0])  # as a device mesh's subgroups are

        def timeouts():
            return [g._get_backend(torch.device("cpu")).options._timeout for g in (dist.group.WORLD, sub)]

        switch = CollectiveTimeouts(short_seconds=7, long_minutes=1)
        switch.short()
        assert timeouts() == [timedelta(seconds=7)] * 2
        switch.long()
        assert timeouts() == [timedelta(minutes=1)] * 2
    finally:
        dist.destroy_process_group()


# --- the fault kinds ---------------------------------------------------------------------------------

def test_hang_crash_and_slow_faults(monkeypatch):
    assert parse_faults(["hang@3:1", "crash@2", "slow@4:1"]) == [Fault("hang", 3, 1), Fault("crash", 2, 0),
                                                                  Fault("slow", 4, 1)]
    # a restarted attempt meets no hang or crash: they return instead of blocking or exiting
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    fault_injection.hang(None)
    fault_injection.crash(None)
    weight = torch.nn.Parameter(torch.ones(2))
    engine = SimpleNamespace(optimizer=torch.optim.SGD([weight], lr=0.1))
    fault_injection.slow(engine)
    fault_injection.slow(engine)  # once is enough
    weight.grad = torch.ones(2)
    started = time.monotonic()
    engine.optimizer.step()
    assert fault_injection.SLOW_SECONDS <= time.monotonic() - started < 2 * fault_injection.SLOW_SECONDS


# --- real jobs under the launch script ---------------------------------------------------------------

def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "MASTER_", "RANK", "WORLD_"))}
    env.update(OMP_NUM_THREADS="1", GPUS_PER_NODE="2", **extra)
    return env


def _launch(save: Path, log: Path, out: Path, extra: list, max_restarts: int) -> subprocess.Popen:
    args = ["bash", str(LAUNCH), *TINY, "--train-iters", str(ITERS), "--save", str(save), "--load", str(save),
            "--save-interval", str(SAVE_INTERVAL), "--log-file", str(log), *extra]
    with open(out, "w") as sink:
        return subprocess.Popen(args, env=_env(MAX_RESTARTS=str(max_restarts)), cwd=REPO, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [r for r in records if "lm_loss" in r]


def _watchdog_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("hang watchdog, rank ")]


@pytest.mark.slow
def test_a_hung_rank_is_named_and_the_job_ends_within_the_timeout(tmp_path):
    save, log, out = tmp_path / "ckpt", tmp_path / "log.jsonl", tmp_path / "out.txt"
    proc = _launch(save, log, out, ["--distributed-timeout-seconds-after-init", str(S),
                                    "--flight-recorder-trace-buffer-size", "100", "--inject-fault", "hang@4:1"],
                   max_restarts=0)
    deadline = time.time() + 180
    while not [r for r in _records(log) if r["iteration"] == 4]:  # rank 1 hangs right after this step
        assert proc.poll() is None and time.time() < deadline, out.read_text()[-3000:]
        time.sleep(0.05)
    hung = time.monotonic()
    code = finish(proc, out, 240)
    took = time.monotonic() - hung
    text = out.read_text()
    assert code != 0 and took < S + 5, (code, took, text[-3000:])
    lines = _watchdog_lines(text)
    # both ranks report: rank 0 waited for rank 1, rank 1 knows itself behind
    assert {line.split()[3] for line in lines} == {"0", "1"}, text[-3000:]
    for line in lines:
        assert re.search(r"did not arrive: rank 1 \(\S+, cpu: iteration 4, step for", line), line
    folder = save / "debug" / "hang-iteration4-attempt0"
    live, hung_rank = (folder / "rank0.txt").read_text(), (folder / "rank1.txt").read_text()
    # the live rank's stacks show it waiting in the collective of the stop decision (or the next step's)
    assert "did not arrive: rank 1" in live and re.search(r"in (should_stop|step)\n", live), live
    # the hung rank's show where it hung
    assert "fault_injection.py" in hung_rank and "in hang\n" in hung_rank, hung_rank
    trace = pickle.loads((folder / "rank0.flight_recorder.pkl").read_bytes())
    assert trace["entries"] and trace["entries"][-1]["profiling_name"].startswith("gloo:")


@pytest.mark.slow
@needs_proc
def test_a_crashed_and_a_frozen_rank_are_restarted_and_the_run_resumes_exactly(tmp_path):
    """Attempt 0: rank 1 crashes after iteration 5. Attempt 1: rank 1 is frozen from outside (SIGSTOP)
    mid-run; rank 0's watchdog names it, torchrun kills it and restarts. Attempt 2 finishes. Rank 1
    is slowed (0.5 s a step) so the freeze lands mid-run. Every loss equals an uninterrupted run's."""
    faulty, whole = tmp_path / "faulty", tmp_path / "whole"
    faulty.mkdir(), whole.mkdir()
    proc = _launch(faulty / "ckpt", faulty / "log.jsonl", faulty / "out.txt",
                   ["--distributed-timeout-seconds-after-init", str(S), "--inject-fault", "crash@5:1",
                    "slow@1:1"], max_restarts=2)
    # the reference runs meanwhile: the freeze's wait is mostly torchrun's 30 s before its SIGKILL
    reference = _launch(whole / "ckpt", whole / "log.jsonl", whole / "out.txt", [], max_restarts=0)
    try:
        deadline = time.time() + 180
        freeze_after = 10
        while True:
            records = _records(faulty / "log.jsonl")
            iterations = [r["iteration"] for r in records]
            restarted = any(b <= a for a, b in zip(iterations, iterations[1:]))
            if restarted and iterations[-1] >= freeze_after:
                break
            assert proc.poll() is None and time.time() < deadline, (faulty / "out.txt").read_text()[-3000:]
            time.sleep(0.05)
        victim = trainer_pid(proc.pid, rank=1, attempt=1)
        assert victim is not None
        os.kill(victim, signal.SIGSTOP)
        assert finish(proc, faulty / "out.txt", 240) == 0, (faulty / "out.txt").read_text()[-3000:]
        assert finish(reference, whole / "out.txt", 240) == 0, (whole / "out.txt").read_text()[-3000:]
    finally:
        for p in (proc, reference):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    text = (faulty / "out.txt").read_text()
    assert "rank 1: --inject-fault crash: this rank's process exits now with code 1" in text
    crashed, frozen = _watchdog_lines(text)  # rank 0's, in attempts 0 and 1
    # the crash: rank 0's collective failed at once (the connection closed), and rank 1 is named
    assert crashed.startswith("hang watchdog, rank 0 ") and "a collective failed" in crashed
    assert re.search(r"did not arrive: rank 1 \(\S+, cpu: iteration 5, step for [\d.]+ s; behind", crashed), crashed
    assert frozen.startswith("hang watchdog, rank 0 ") and re.search(
        r"did not arrive: rank 1 \(\S+, cpu: last heard of [\d.]+ s ago, at iteration \d+, .*: a frozen or dead "
        r"process\)", frozen), frozen
    assert list((faulty / "ckpt" / "debug").glob("hang-iteration*-attempt1/rank0.txt"))
    resumed = [int(i) for i in re.findall(r"resumed from \S+ at iteration (\d+)", text)]
    assert len(resumed) == 2 and resumed[0] == 3 and resumed[1] >= 9, text[-3000:]
    records = _records(faulty / "log.jsonl")
    expected = {r["iteration"]: (r["lm_loss"], r["consumed_samples"]) for r in _records(whole / "log.jsonl")}
    assert sorted(expected) == list(range(1, ITERS + 1))
    assert records[-1]["iteration"] == ITERS
    # every attempt's iterations, the resumed ones included, equal the uninterrupted run's
    for r in records:
        assert (r["lm_loss"], r["consumed_samples"]) == expected[r["iteration"]], r["iteration"]
    assert [r["iteration"] for r in records[-(ITERS - resumed[1]):]] == list(range(resumed[1] + 1, ITERS + 1))
