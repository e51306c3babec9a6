"""Restarts under torchrun: a trainer killed mid-run is restarted and resumes exactly; each restart
attempt meets on keys of its own; a trainer still in start-up ends at once on SIGTERM or SIGINT."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
from port_helpers import reserved_port
from trainer_processes import finish, trainer_pid

from megatron_mellama.parallel.mesh import init_distributed, torchrun_attempt_store

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--num-layers", "2", "--mock-data", "--vocab-size", "256", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--eval-iters", "1",
        "--eval-interval", "100000", "--log-interval", "1", "--num-workers", "0"]
ITERS, SAVE_INTERVAL = 16, 3
needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc to find the trainers")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "MASTER_", "RANK", "WORLD_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


# --- the store per attempt ---------------------------------------------------------------------

def _agent_env(monkeypatch, port: int, attempt: int, world: int = 2) -> None:
    for name, value in (("TORCHELASTIC_USE_AGENT_STORE", "True"), ("TORCHELASTIC_RESTART_COUNT", str(attempt)),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("WORLD_SIZE", str(world)),
                        ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)


def test_each_attempt_reads_and_writes_keys_of_its_own(monkeypatch):
    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    stores = []
    for attempt in (0, 1):
        _agent_env(monkeypatch, agent.port, attempt)
        stores.append(torchrun_attempt_store(timedelta(seconds=10)))
    first, second = stores
    first.set("rank_0", "address of attempt 0")
    assert not second.check(["rank_0"])  # a restart never reads a dead attempt's address
    second.set("rank_0", "address of attempt 1")
    assert first.get("rank_0") == b"address of attempt 0" and agent.get("attempt1/rank_0") == b"address of attempt 1"
    # torchrun with a fresh store per attempt (no agent store), or no torchrun at all: torch's own start
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert torchrun_attempt_store(timedelta(seconds=10)) is None
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    assert torchrun_attempt_store(timedelta(seconds=10)) is None


def test_the_process_group_is_built_on_the_attempts_keys(monkeypatch):
    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    _agent_env(monkeypatch, agent.port, attempt=2, world=1)
    given, real = {}, dist.init_process_group

    def recording(*args, **kwargs):
        given.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(dist, "init_process_group", recording)
    init_distributed("gloo", timeout_minutes=0.5)
    try:
        dist.barrier()
        assert (given["rank"], given["world_size"], given["timeout"]) == (0, 1, timedelta(seconds=30))
        given["store"].set("probe", "x")
        assert agent.get("attempt2/probe") == b"x" and not agent.check(["probe"])
    finally:
        dist.destroy_process_group()


# --- SIGTERM / SIGINT during start-up ----------------------------------------------------------

def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _blocked_in_set_up(tmp_path: Path, port: int) -> subprocess.Popen:
    # rank 0 of a world of 2 whose rank 1 never comes: it hosts the store and waits in C++ for rank 1
    env = _env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return subprocess.Popen([sys.executable, "-m", "megatron_mellama.pretrain", *TINY, "--train-iters", "2"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_trainer_blocked_in_process_group_set_up_ends_at_once_on_sigterm_and_sigint(tmp_path):
    ports = {sig: reserved_port() for sig in (signal.SIGTERM, signal.SIGINT)}
    procs = {sig: _blocked_in_set_up(tmp_path, port) for sig, port in ports.items()}
    try:
        deadline = time.time() + 90
        while not all(_listening(port) for port in ports.values()):
            for proc in procs.values():
                assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        time.sleep(1.0)  # inside init_process_group, waiting for rank 1
        for sig, proc in procs.items():
            assert proc.poll() is None
            sent = time.monotonic()
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=10)
            took = time.monotonic() - sent
            assert proc.returncode == 128 + sig, (proc.returncode, err)
            assert took < 3, took
            lines = [line for line in err.splitlines() if line.strip()]
            assert lines == [f"rank 0: received {sig.name} during start-up, before the first iteration: exiting "
                             "now (nothing trained, nothing to save)"], err
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


FORKED_CHILD_SIGNALLED = """
import os, signal, time
from megatron_mellama.training.stop_signals import StopSignals
signals = StopSignals().install()
child = os.fork()
if child == 0:  # a helper process forked during start-up, with a handler of its own
    signal.signal(signal.SIGTERM, lambda *a: None)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.3)
    os._exit(0)
os.waitpid(child, 0)
time.sleep(0.5)
signals.end_start_up()
os.kill(os.getpid(), signal.SIGTERM)  # after start-up: kept for the next step boundary
time.sleep(0.2)
print("alive", signal.Signals(signals.received).name)
"""


def test_only_the_trainers_own_signals_end_its_start_up():
    result = subprocess.run([sys.executable, "-c", FORKED_CHILD_SIGNALLED], env=_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, "alive SIGTERM"), result.stderr


# --- a killed trainer: torchrun restarts the job, which resumes exactly ------------------------

def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [r for r in records if "lm_loss" in r]  # the training iterations, not evaluations


def _torchrun(save: Path, log: Path, out: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--max-restarts", "1", "-m", "megatron_mellama.pretrain", *TINY, "--train-iters", str(ITERS),
            "--save", str(save), "--load", str(save), "--save-interval", str(SAVE_INTERVAL), "--log-file", str(log)]
    with open(out, "w") as sink:
        return subprocess.Popen(args, env=_env(), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)


@pytest.mark.slow
@needs_proc
def test_a_trainer_killed_mid_run_is_restarted_and_resumes_exactly(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    killed.mkdir(), whole.mkdir()
    proc = _torchrun(killed / "ckpt", killed / "log.jsonl", killed / "out.txt")
    kill_after = SAVE_INTERVAL + 2  # a checkpoint exists to resume, and iterations after it are lost
    deadline = time.time() + 120
    while not [r for r in _records(killed / "log.jsonl") if r["iteration"] >= kill_after]:
        assert proc.poll() is None and time.time() < deadline, (killed / "out.txt").read_text()[-3000:]
        time.sleep(0.05)
    victim = trainer_pid(proc.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    assert finish(proc, killed / "out.txt", 180) == 0, (killed / "out.txt").read_text()[-3000:]

    reference = _torchrun(whole / "ckpt", whole / "log.jsonl", whole / "out.txt")
    assert finish(reference, whole / "out.txt", 180) == 0, (whole / "out.txt").read_text()[-3000:]

    text = (killed / "out.txt").read_text()
    resumed = [int(i) for i in re.findall(r"resumed from \S+ at iteration (\d+)", text)]
    assert len(resumed) == 1 and resumed[0] > 0 and resumed[0] % SAVE_INTERVAL == 0, text[-3000:]
    records = _records(killed / "log.jsonl")
    iterations = [r["iteration"] for r in records]
    restart = next(i for i in range(1, len(iterations)) if iterations[i] <= iterations[i - 1])
    first, second = records[:restart], records[restart:]
    assert first[-1]["iteration"] >= kill_after and second[0]["iteration"] == resumed[0] + 1
    assert [r["iteration"] for r in second] == list(range(resumed[0] + 1, ITERS + 1))
    expected = {r["iteration"]: (r["lm_loss"], r["consumed_samples"]) for r in _records(whole / "log.jsonl")}
    assert sorted(expected) == list(range(1, ITERS + 1))
    # the attempt that was killed, and the one that resumed, each equal the uninterrupted run
    for r in first + second:
        assert (r["lm_loss"], r["consumed_samples"]) == expected[r["iteration"]], r["iteration"]
    assert (killed / "ckpt" / "latest").read_text().strip() == str(ITERS)
