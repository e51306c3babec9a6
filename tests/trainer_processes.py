"""The trainers of a torchrun job seen from outside, for the tests that stop, kill or freeze one of
them (`test_restarts.py`, `test_hangs.py`, `test_stragglers.py`)."""

import os
import signal
import subprocess
from pathlib import Path

import pytest


def trainer_pid(torchrun: int, rank: int, attempt: int | None = None) -> int | None:
    """The pid of global rank `rank` among torchrun's children (of its attempt `attempt`, when given),
    read from /proc; None while it has not started."""
    want = {f"RANK={rank}".encode()}
    if attempt is not None:
        want.add(f"TORCHELASTIC_RESTART_COUNT={attempt}".encode())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = set(Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"))
        except (OSError, IndexError, ValueError):
            continue
        if ppid == torchrun and want <= environ:
            return int(entry)
    return None


def finish(proc: subprocess.Popen, out: Path, timeout: float) -> int:
    """The job's exit code; past `timeout`, its process group is killed and the test fails with the
    end of its output."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the job did not end:\n{out.read_text()[-3000:]}")
