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
            return ["AuthType=auth/none", "CredType=cred/none"]
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
        return ["AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={socket_path}"]

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

    def submit(self, work: Path, name: str, trainer_args: list[str]) -> "Job":
        output = work / f"{name}.out"
        env = dict(self.env, GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(reserved_port()),
                   EXIT_CODE_DIR=str(work / f"{name}-exit-codes"), OMP_NUM_THREADS="1")
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
        return self.info()["JobState"] in ("PENDING", "CONFIGURING", "RUNNING")

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


def test_usr1_saves_and_the_next_job_resumes(cluster, tmp_path):
    save, first_log = tmp_path / "ckpt", tmp_path / "first.jsonl"
    job = cluster.submit(tmp_path, "preempted", [*TINY, "--train-iters", "100000", "--save", str(save),
                                                 "--log-file", str(first_log)])

    def trained_a_few():
        if not job.running():
            raise AssertionError(f"job {job.id} ended before the signal:\n{job.text()}")
        return len(_log(first_log)) >= 3

    _wait_for(trained_a_few, START_TIMEOUT, "three iterations", interval=1)
    # what --signal=USR1@N does at the time limit: SIGUSR1 to every process of the job's steps
    cluster.run(["scancel", "--signal=USR1", job.id])
    code = job.wait()
    text = job.text()
    assert code == 0, text
    assert (save / "latest").exists(), text
    saved = int((save / "latest").read_text().strip())
    stops = re.findall(r"received SIGUSR1: saving and exiting at iteration (\d+)", text)
    assert stops and {int(i) for i in stops} == {saved}, text
    assert re.search(r"exit code 0 on n1", text) and re.search(r"exit code 0 on n2", text), text
    by_iteration = {rec["iteration"]: rec for rec in _log(first_log)}
    assert saved in by_iteration, text

    second_log = tmp_path / "second.jsonl"
    # the same --train-iters (it sets the learning-rate schedule, which a resume must keep); three
    # more steps, then --exit-interval stops it
    job = cluster.submit(tmp_path, "resumed", [*TINY, "--train-iters", "100000", "--exit-interval", str(saved + 3),
                                               "--load", str(save), "--save", str(save),
                                               "--log-file", str(second_log)])
    code = job.wait(START_TIMEOUT)
    text = job.text()
    assert code == 0, text
    records = _log(second_log)
    assert [r["iteration"] for r in records] == [saved + 1, saved + 2, saved + 3], text
    samples = by_iteration[saved]["consumed_samples"]
    assert [r["consumed_samples"] for r in records] == [samples + 4, samples + 8, samples + 12], text


def test_configuration_error_is_the_jobs_exit_code(cluster, tmp_path):
    # a global batch that is no multiple of micro-batch x DP: every trainer exits 2 at start-up
    bad = [*TINY, "--train-iters", "10", "--micro-batch-size", "3"]
    job = cluster.submit(tmp_path, "misconfigured", bad)
    code = job.wait(START_TIMEOUT)
    text = job.text()
    assert code == 2, text
    assert "job exit code 2" in text, text
