"""launch/slurm_multi_node.sbatch under a real SLURM, as a user runs it: a throwaway cluster of two
nodes on this machine trains DP 2 across them (CPU, gloo), is told to stop the way a time limit
does it (SIGUSR1 to every process of the step), saves, and resumes in a second job; a third job
with a configuration error must end with the trainers' exit code 2.

Skipped where SLURM is not installed (CI does not install it). On Debian/Ubuntu:
    apt-get install -y slurm-wlm munge
    python -m pytest -q tests/test_slurm.py
The daemons run as root with a private configuration, state, ports and (if munge is installed) a
private munge key and socket; nothing of a system-wide SLURM is used or changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from port_helpers import reserved_port

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "slurm_multi_node.sbatch"
NODES = ("n1", "n2")
CPUS_PER_NODE = 2

pytestmark = [
    pytest.mark.skipif(any(shutil.which(tool) is None for tool in ("slurmctld", "slurmd", "sbatch", "scontrol",
                                                                     "scancel")),
                       reason="SLURM is not installed (apt-get install slurm-wlm munge)"),
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                       reason="slurmd must run as root to start jobs"),
]

TINY = ["--model", "tiny", "--mock-data", "--seq-length", "32", "--max-position-embeddings", "32",
        "--vocab-size", "128", "--micro-batch-size", "2", "--global-batch-size", "4", "--log-interval", "1",
        "--eval-iters", "0", "--save-interval", "100000", "--num-workers", "2"]
# job lifetimes on a shared 2-core machine, where every process start imports torch
START_TIMEOUT = 150
END_TIMEOUT = 120
# SLURM holds a requeued job for the credential lifetime (120 s by default) before it may start again
REQUEUE_DELAY = "cred_expire=10"


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.jobs: list[str] = []
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        self.env["SLURM_CONF"] = str(root / "slurm.conf")
        self.munge_dir: Path | None = None

    # -- daemons --------------------------------------------------------------------------------
    def _start(self, argv: list[str], log: str) -> subprocess.Popen:
        with open(self.root / "log" / log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def _auth_lines(self) -> list[str]:
        munged = shutil.which("munged", path=f"{os.environ.get('PATH', '')}{os.pathsep}/usr/sbin")
        if not munged:
            # Slurm up to 23.02 still ships auth/none; later versions need munge (or auth/slurm)
            return ["AuthType=auth/none", "CredType=cred/none", f"AuthInfo={REQUEUE_DELAY}"]
        # munged refuses a socket folder that others cannot traverse, as pytest's tmp_path is
        self.munge_dir = Path(tempfile.mkdtemp(prefix="mellama-munge-"))
        self.munge_dir.chmod(0o755)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = self.munge_dir / "munge.sock"
        self._start([munged, "--foreground", f"--socket={socket_path}", f"--key-file={key}",
                     f"--log-file={self.munge_dir / 'munged.log'}", f"--pid-file={self.munge_dir / 'munged.pid'}",
                     f"--seed-file={self.munge_dir / 'munged.seed'}"], "munged.out")
        _wait_for(socket_path.exists, 20, "munged's socket")
        return ["AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={socket_path},{REQUEUE_DELAY}"]

    def start(self) -> None:
        root = self.root
        for sub in ("state", "log", *(f"spool/{n}" for n in NODES)):
            (root / sub).mkdir(parents=True, exist_ok=True)
        ports = {name: reserved_port() for name in ("ctld", *NODES)}
        lines = [
            "ClusterName=mellamatest",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={ports['ctld']}",
            "SlurmUser=root",
            "SlurmdUser=root",
            *self._auth_lines(),
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool' / '%n'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            # look at pending jobs every 2 s (default 60 s, backfill 30 s): a requeued job starts soon
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "MpiDefault=none",
            "ReturnToService=2",
            # both nodes claim the machine's cores: oversubscribed, which a tiny model tolerates
            "SlurmdParameters=config_overrides",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            # the seconds between SIGTERM and SIGKILL when a job is cancelled: short teardown
            "KillWait=5",
            *(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={ports[n]} CPUs={CPUS_PER_NODE} "
              "State=UNKNOWN" for n in NODES),
            f"PartitionName=test Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP",
        ]
        (root / "slurm.conf").write_text("\n".join(lines) + "\n")
        self._start(["slurmctld", "-D", "-c", "-f", self.env["SLURM_CONF"]], "slurmctld.out")
        for n in NODES:
            self._start(["slurmd", "-D", "-N", n, "-f", self.env["SLURM_CONF"]], f"slurmd-{n}.out")
        _wait_for(lambda: self.idle_nodes() == set(NODES), 60, "both nodes idle")

    def idle_nodes(self) -> set[str]:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout
        return {line.split()[0] for line in out.splitlines() if line.split()[1:] == ["idle"]}

    def stop(self) -> None:
        if self.jobs:
            self.run(["scancel", *self.jobs], check=False)
            try:
                _wait_for(lambda: not self.run(["squeue", "-h", "-j", ",".join(self.jobs)], check=False).stdout.strip(),
                          30, "the jobs to end")
            except TimeoutError:
                pass
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((self.root / "log").iterdir()))

    # -- clients --------------------------------------------------------------------------------
    def run(self, argv, check=True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60, check=check, **kw)

    def submit(self, work: Path, name: str, trainer_args: list[str], **settings: str) -> "Job":
        """`settings`: the script's environment settings (MAX_REQUEUES=...)."""
        output = work / f"{name}.out"
        env = dict(self.env, GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(reserved_port()),
                   EXIT_CODE_DIR=str(work / f"{name}-exit-codes"), OMP_NUM_THREADS="1", **settings)
        # the header asks for 8 GPUs, 64 cores and more; these nodes have no GPUs and 2 cores
        argv = ["sbatch", "--parsable", "--export=ALL", "--job-name", name, "--nodes", "2",
                "--gpus-per-node=0", f"--cpus-per-task={CPUS_PER_NODE}", f"--output={output}",
                str(SCRIPT), *trainer_args]
        result = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        job = Job(self, result.stdout.strip().split(";")[0], output)
        self.jobs.append(job.id)
        return job


class Job:
    def __init__(self, cluster: Cluster, job_id: str, output: Path):
        self.cluster, self.id, self.output = cluster, job_id, output

    def info(self) -> dict:
        out = self.cluster.run(["scontrol", "-o", "show", "job", self.id]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, timeout: float = END_TIMEOUT) -> int:
        """The job's exit code, as sacct and `sbatch --wait` give it, once it has ended."""
        ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")
        try:
            info = _wait_for(lambda: (lambda i: i if i["JobState"] in ended else None)(self.info()), timeout,
                             f"job {self.id} to end")
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{self.text()}") from None
        code, sig = (int(x) for x in info["ExitCode"].split(":"))
        return 128 + sig if sig else code

    def running(self) -> bool:
        return self.info()["JobState"] in ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "COMPLETING")

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else "(no output yet)"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except BaseException:
        logs = c.logs()
        c.stop()
        pytest.fail(f"could not start the local SLURM:\n{logs}")
    yield c
    c.stop()


def _log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


# 8 micro-batches a step: slow enough for a job to be told to stop long before the run's end
CHAIN = [*TINY[:TINY.index("--global-batch-size")], "--global-batch-size", "32",
         *TINY[TINY.index("--global-batch-size") + 2:], "--train-iters", "40"]
ITERS = 40


def _reference_run(work: Path) -> tuple[subprocess.Popen, Path]:
    """The uninterrupted run: the same flags on the same 2 processes, under torchrun on this machine."""
    save, log = work / "ckpt", work / "train.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    argv = ["torchrun", "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{reserved_port()}", "-m", "megatron_mellama.pretrain", *CHAIN,
            "--save", str(save), "--load", str(save), "--log-file", str(log)]
    work.mkdir()
    with open(work / "out.txt", "w") as out:
        return subprocess.Popen(argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True), log


def _stop_after(cluster: Cluster, job: Job, log: Path, iteration: int) -> None:
    """SIGUSR1 to every process of the job's steps, as --signal=USR1@N does at the time limit, once
    the run has logged `iteration`."""
    def reached():
        if not job.running():
            raise AssertionError(f"job {job.id} ended before the signal:\n{job.text()}")
        return any(r["iteration"] >= iteration for r in _log(log))

    _wait_for(reached, START_TIMEOUT, f"iteration {iteration}", interval=0.5)
    cluster.run(["scancel", "--signal=USR1", job.id])


def _stops(text: str) -> list[int]:
    return [int(i) for i in re.findall(r"stopping at iteration (\d+): received SIGUSR1(?: on another rank)?: saving and exiting", text)]


def test_the_time_limit_signal_requeues_the_job_until_the_chain_bound(cluster, tmp_path):
    """A chain of MAX_REQUEUES=1: the first job is told to stop, saves and requeues itself; the
    requeued job resumes, is told to stop again, saves and ends (the bound); the same command line
    submitted again finishes the run. Every loss equals the uninterrupted run's."""
    save, log = tmp_path / "ckpt", tmp_path / "train.jsonl"
    flags = [*CHAIN, "--save", str(save), "--load", str(save), "--log-file", str(log)]
    job = cluster.submit(tmp_path, "chain", flags, MAX_REQUEUES="1")
    _stop_after(cluster, job, log, 3)
    _wait_for(lambda: job.info()["Restarts"] == "1", END_TIMEOUT, f"job {job.id} to requeue itself")
    text = job.text()
    first = _stops(text)
    assert len(first) == 1 and int((save / "latest").read_text()) == first[0], text
    assert f"requeueing job {job.id} (requeue 1 of at most 1): stopped at iteration {first[0]} of {ITERS}" in text
    assert re.search(r"exit code 0 on n1", text) and re.search(r"exit code 0 on n2", text), text
    # meanwhile (SLURM holds a requeued job before it may start again), the run to compare with
    reference, reference_log = _reference_run(tmp_path / "reference")
    try:
        # the requeued job: the same script and flags, resuming the checkpoint; told to stop again
        _stop_after(cluster, job, log, first[0] + 3)
        code = job.wait()
        text = job.text()
        assert code == 0, text
        stops = _stops(text)
        assert len(stops) == 2 and stops[1] > first[0] and int((save / "latest").read_text()) == stops[1], text
        assert f"resumed from {save} at iteration {first[0]}" in text
        assert "not requeued: this job was requeued 1 times, MAX_REQUEUES is 1" in text, text
        assert job.info()["Restarts"] == "1"

        again = cluster.submit(tmp_path, "again", flags, MAX_REQUEUES="1")
        code = again.wait(START_TIMEOUT)
        text = again.text()
        assert code == 0 and f"resumed from {save} at iteration {stops[1]}" in text, text
        assert "requeue" not in text and again.info()["Restarts"] == "0", text
        assert reference.wait(timeout=START_TIMEOUT) == 0, (tmp_path / "reference" / "out.txt").read_text()[-3000:]
    finally:
        if reference.poll() is None:
            os.killpg(reference.pid, signal.SIGKILL)
            reference.wait()
    records = _log(log)
    # each iteration once, from 1 to the end: no step repeated or skipped across the three jobs
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1))
    expected = _log(reference_log)
    assert [(r["consumed_samples"], r["lm_loss"]) for r in records] == \
        [(r["consumed_samples"], r["lm_loss"]) for r in expected]


def test_configuration_error_is_the_jobs_exit_code(cluster, tmp_path):
    # a global batch that is no multiple of micro-batch x DP: every trainer exits 2 at start-up
    bad = [*TINY, "--train-iters", "10", "--micro-batch-size", "3"]
    job = cluster.submit(tmp_path, "misconfigured", bad)
    code = job.wait(START_TIMEOUT)
    text = job.text()
    assert code == 2, text
    assert "job exit code 2" in text, text
    # a failed job is not requeued (the script's header asks SLURM for requeueable jobs)
    assert "requeue" not in text and job.info()["Restarts"] == "0", text
