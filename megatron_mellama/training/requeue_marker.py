"""What a SLURM job chain needs to know once the trainers have exited 0: did the run stop at its time
limit before its last iteration, and would the same command line, launched again, resume it?

The trainers exit 0 both when the run is done and when a signal stopped it after a save, so
`launch/slurm_multi_node.sbatch` cannot tell the two apart by exit codes. It sets
MELLAMA_UNFINISHED_FILE (a path on the file system every node shares); rank 0 writes one line there
when the run stopped at a time limit before its last iteration, and nothing otherwise. The line is
`resumable <what happened>` or `not-resumable <why>`; the batch script requeues the job on the
first (within its bound, MAX_REQUEUES) and prints the reason on the second.

A time limit is SIGUSR1 (what `#SBATCH --signal=USR1@900` sends, as does
`scancel --signal=USR1 JOBID`) on some rank and SIGTERM on none, or `--exit-duration-in-mins`.
SIGTERM (a plain `scancel`, a preemption), `--exit-interval`, a finished run and a failed one
write nothing: those end the chain.

Resumable means the requeued job, given the same flags, continues the checkpoint this run saved
in --save: `--save DIR --load DIR` (no --finetune), or `--pretrained-checkpoint PRE --save DIR`
(--load left out or DIR). Anything else would start over or be refused by the --save guard
(`checkpoint/save_root.py`) after the requeued job waited in the queue; the batch script says why
instead of requeueing. The decision reads the flags as given, before `--pretrained-checkpoint`
sets --load and --finetune for this launch.
"""

from __future__ import annotations

import os

from ..config import Config
from .console import print0

ENV = "MELLAMA_UNFINISHED_FILE"


def _same_path(a: str | None, b: str | None) -> bool:
    return bool(a and b) and os.path.realpath(a) == os.path.realpath(b)


def why_not_resumable(cfg: Config) -> str | None:
    """None when these flags, launched again after this run saved into --save, resume that
    checkpoint; otherwise one line saying why not and what to give instead."""
    c = cfg.checkpoint
    if not c.save:
        return "no --save: a requeued job would have no checkpoint of this run to resume"
    if c.pretrained_checkpoint:
        if c.load and not _same_path(c.load, c.save):
            return (f"--pretrained-checkpoint with --load {c.load}: a requeued job would resume {c.load}, not "
                    f"this run's --save {c.save}; leave --load out")
        return None
    if c.finetune:
        return (f"--finetune --load {c.load}: a requeued job would start over from {c.load} (and be refused by "
                f"the --save guard); use --pretrained-checkpoint {c.load} --save {c.save} instead")
    if not _same_path(c.load, c.save):
        given = f"--load {c.load}" if c.load else "no --load"
        return (f"{given} with --save {c.save}: a requeued job would not resume this run's checkpoints; "
                f"give --load {c.save}")
    return None


class UnfinishedMarker:
    """Made before the run's start is resolved (the flags as given); `record` after the run."""

    def __init__(self, cfg: Config, iterations: int):
        self.path = os.environ.get(ENV) or None
        self.iterations = iterations
        self.why_not = why_not_resumable(cfg) if self.path else None

    def record(self, history: dict, time_limit: bool) -> None:
        """`time_limit`: the ranks agreed to stop for SIGUSR1 or --exit-duration-in-mins
        (`RunControl.time_limit`). Rank 0 writes; the others do nothing."""
        if not self.path or os.environ.get("RANK", "0") != "0":
            return
        iteration = history["iteration"]
        if not time_limit or iteration >= self.iterations:
            return
        if self.why_not:
            line = f"not-resumable {self.why_not}"
        else:
            line = f"resumable stopped at iteration {iteration} of {self.iterations}: {history['stopped']}"
        partial = f"{self.path}.partial"
        try:
            with open(partial, "w") as fh:
                fh.write(line + "\n")
            os.replace(partial, self.path)
        except OSError as e:
            # the checkpoint is saved: the job ends well, but its chain ends here
            print0(f"could not write {ENV}={self.path} ({e}): the job will not be requeued")
