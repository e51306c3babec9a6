"""Preemption as schedulers deliver it: a signal to every process of a torchrun job (torchrun, the
trainers and their data-loader workers), a signal during start-up, and output paths that cannot be
written, found before any work."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

from megatron_mellama.config import ConfigError
from megatron_mellama.config.paths import prepare_output_paths
from megatron_mellama.pretrain import load_run_config, main
from megatron_mellama.training import loop

REPO = Path(__file__).resolve().parents[1]
RUN = ["--model", "tiny", "--mock-data", "--vocab-size", "256", "--seq-length", "32", "--micro-batch-size", "2",
       "--global-batch-size", "4", "--lr", "3e-3", "--eval-iters", "1", "--eval-interval", "100000",
       "--log-interval", "1", "--train-iters", "100000"]


def _descendants(root: int) -> list[int]:
    """`root` and every process below it. torchrun starts each trainer in a session of its own, so
    a process group does not reach them; a scheduler signals every process of the job."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _launch(args, log: Path) -> subprocess.Popen:
    # the single-node launch script, as users start a job (it makes torchrun ignore SIGUSR1)
    env = dict(os.environ, GPUS_PER_NODE="2", OMP_NUM_THREADS="1")
    with open(log, "w") as out:
        return subprocess.Popen(["bash", str(REPO / "launch" / "torchrun_single_node.sh"), *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)


def _wait_for_iteration(proc, log: Path, at_least: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        logged = [int(i) for i in re.findall(r"iteration\s+(\d+)/", log.read_text())]
        if logged and max(logged) >= at_least:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended early:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"no iteration {at_least} in {timeout} s:\n{log.read_text()[-3000:]}")


def _end(proc) -> int:
    try:
        return proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in _descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pytest.fail("the job did not end after the signal")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="walks /proc to find the job's processes")
@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGTERM"])
def test_signal_to_every_process_of_a_job_with_workers_saves_and_resumes(tmp_path, sig):
    save, log = tmp_path / "ckpt", tmp_path / "first.log"
    args = RUN + ["--save", str(save), "--num-workers", "2"]
    proc = _launch(args, log)
    _wait_for_iteration(proc, log, 3)
    workers = [p for p in _descendants(proc.pid) if p != proc.pid]
    assert len(workers) >= 2 + 2 * 2  # torchrun, two trainers, two loader workers each
    for pid in _descendants(proc.pid):
        os.kill(pid, getattr(signal, sig))
    rc = _end(proc)
    out = log.read_text()
    # no trainer traceback (a loader worker killed by the signal raised one in the trainer)
    assert "killed by signal" not in out and not re.search(r'File ".*megatron_mellama', out), out[-3000:]
    stops = re.findall(rf"stopping at iteration (\d+): received {sig}", out)
    assert stops, out[-3000:]
    saved = int((save / "latest").read_text())
    assert saved == int(stops[0]) and (save / f"iter_{saved:07d}" / ".metadata").is_file()
    if sig == "SIGUSR1":
        # torchrun ignored it and reports its trainers' success; on SIGTERM torchrun itself is
        # told to end, and reports that (its trainers still saved and exited 0)
        assert rc == 0, out[-3000:]
        again = tmp_path / "second.log"
        # the same run (a changed --train-iters would change its schedule), two more iterations
        proc = _launch(RUN + ["--exit-interval", str(saved + 2), "--save", str(save), "--load", str(save),
                              "--num-workers", "2"], again)
        assert _end(proc) == 0, again.read_text()[-3000:]
        text = again.read_text()
        assert f"at iteration {saved}, consumed samples {saved * 4}" in text
        assert re.findall(r"iteration\s+(\d+)/", text) == [str(saved + 1), str(saved + 2)]


def test_a_signal_during_start_up_stops_before_training(tmp_path):
    real = loop.build_datasets

    def slow_start_up(cfg):  # the signal lands while the run is still being built
        os.kill(os.getpid(), signal.SIGUSR1)
        return real(cfg)

    cfg = load_run_config(RUN + ["--num-workers", "0", "--save", str(tmp_path / "ckpt")])
    with mock.patch.object(loop, "build_datasets", slow_start_up):
        history = loop.train(cfg)
    assert history["losses"] == [] and "start-up" in history["stopped"]
    assert not (tmp_path / "ckpt" / "latest").exists()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handed back


def test_unwritable_output_paths_end_the_run_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for flag, value in (("--log-file", blocker / "x" / "log.jsonl"), ("--save", blocker),
                        ("--tensorboard-dir", blocker / "tb"), ("--data-cache-path", blocker / "cache"),
                        ("--log-file", tmp_path)):
        assert main(RUN[:-1] + ["2", flag, str(value)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and flag in err and str(value) in err, err


def test_output_folders_are_created_up_front(tmp_path):
    cfg = load_run_config(RUN + ["--log-file", str(tmp_path / "logs" / "run.jsonl"),
                                 "--tensorboard-dir", str(tmp_path / "tb"), "--save", str(tmp_path / "ck")])
    prepare_output_paths(cfg, rank=0)
    assert (tmp_path / "logs" / "run.jsonl").is_file() and (tmp_path / "tb").is_dir() and (tmp_path / "ck").is_dir()
    # other ranks do not touch rank 0's files
    cfg.logging.log_file = str(tmp_path / "other" / "run.jsonl")
    prepare_output_paths(cfg, rank=1)
    assert not (tmp_path / "other").exists()
    with pytest.raises(ConfigError, match="--save"):
        cfg.checkpoint.save = str(tmp_path / "logs" / "run.jsonl")
        prepare_output_paths(cfg, rank=1)
