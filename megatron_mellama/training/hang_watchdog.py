"""The hang watchdog (`--distributed-timeout-seconds-after-init S`): a rank whose training makes no
progress for S seconds writes what every thread was doing, names the ranks that did not arrive, and
ends its process with exit code 1, instead of the job waiting out a 30-minute collective timeout.

The main thread only assigns a plain attribute: the step it entered (`entered`, at the start of
each iteration) or the periodic job it is in (`job`, from `periodic.run_due_jobs`). No store
traffic, no synchronisation on the hot path. Two daemon threads do the rest:

- the publisher writes this rank's record (the position it entered: steps entered in this attempt,
  iteration, phase; wall time, host, device) into the job's TCPStore about once a second (its own
  client connection, keys under the attempt's prefix, as the process group's: `torchrun_attempt_store`);
- the watchdog fires when the main thread has stayed at one position longer than its limit: S for a
  step and for the short periodic jobs (train log, stopping, garbage collection, replica check), but
  `--distributed-timeout-minutes` for the first step of each launch (warm-up, compilation) and for
  evaluations and checkpoint saves, which legitimately take minutes. The process groups' own timeouts
  follow the same rule (`parallel/timeouts.py`).

When it fires it reads every rank's record and decides which did not arrive (`not_arrived`): a rank
whose record is stale (a frozen or dead process stops publishing) or whose position is behind the
furthest one any live rank reached. Into `<--save>/debug/hang-iteration<I>[-attempt<A>]/rank<R>.txt`
(without --save, `./debug/...` under the working directory) it writes the verdict, every rank's
record, the Python stacks of all threads (`faulthandler`) and, with `--flight-recorder-trace-buffer-size`,
the flight recorder (`rank<R>.flight_recorder.pkl`); it prints one line naming the ranks that did not
arrive with their host and what they were doing, and exits (`os._exit(1)`, after flushing).

A collective that fails before the watchdog's limit (a peer's process ended, so its connection
closed; the collective's own timeout of S ran out first) raises in the main thread: leaving the
watched block with that error, the ranks' records are read, and when a rank did not arrive the same
report is written and the process exits 1 with it; otherwise the error goes on as before.

Records compare wall clocks across hosts: a record is stale after min(S/2, 3) seconds, far above the
clock skew of NTP-synchronised nodes. At 1,000 ranks the store takes 1,000 small writes a second.
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import socket
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from ..errors import MellamaError
from ..parallel.mesh import torchrun_attempt_store
from ..parallel.timeouts import CollectiveTimeouts, dump_flight_recorder
from .jobs.downstream import DownstreamScoring
from .jobs.saving import CheckpointSaving
from .jobs.validation import Validation

FLAG = "--distributed-timeout-seconds-after-init"
# the periodic jobs that may take minutes: the long limit, and the long collective timeout
LONG_JOBS = (Validation, DownstreamScoring, CheckpointSaving)
EXIT_CODE = 1
_PREFIX = "hang-watchdog"


@dataclass(frozen=True)
class Mark:
    """Where the main thread is: set by it, read by the watchdog threads (one attribute, replaced whole)."""

    entries: int  # steps entered in this attempt: equal on every rank at the same point, rollbacks included
    iteration: int
    phase_index: int  # 0: the step; then 1, 2, ... for each due job after it, in the jobs' order
    phase: str
    short: bool  # the limit is S (else --distributed-timeout-minutes)
    since: float  # time.monotonic() when the main thread got here


def position(record: dict) -> tuple[int, int]:
    return record["entries"], record["phase_index"]


def not_arrived(records: dict[int, dict | None], now: float, stale_after: float) -> list[tuple[int, str]]:
    """The ranks that did not arrive, each with why: no record at all, a stale record (a frozen or
    dead process stops publishing), or a position behind the furthest one a live rank reached."""
    fresh = [r for r in records.values() if r is not None and now - r["time"] <= stale_after]
    front = max(fresh, key=position, default=None)
    late = []
    for rank in sorted(records):
        record = records[rank]
        if record is None:
            late.append((rank, "no record: it never started training, or could not reach the store"))
        elif now - record["time"] > stale_after:
            late.append((rank, f"{record['host']}, {record['device']}: last heard of {now - record['time']:.1f} s ago, "
                               f"at iteration {record['iteration']}, {record['phase']}: a frozen or dead process"))
        elif front is not None and position(record) < position(front):
            late.append((rank, f"{record['host']}, {record['device']}: iteration {record['iteration']}, "
                               f"{record['phase']} for {max(0.0, now - record['since']):.1f} s; behind the others "
                               f"(iteration {front['iteration']}, {front['phase']})"))
    return late


def job_name(job) -> str:
    """`CheckpointSaving` -> "checkpoint saving", `ManualGC` -> "manual gc"."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", type(job).__name__).lower()


def _store(timeout: timedelta):
    """A client of the job's store with keys of the watchdog's own (under this attempt's prefix under
    torchrun); None without MASTER_ADDR/MASTER_PORT or when it cannot be reached."""
    env = os.environ
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        return None
    try:
        store = torchrun_attempt_store(timeout)
        if store is None:
            store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timeout)
        return dist.PrefixStore(_PREFIX, store)
    except (RuntimeError, ValueError, OSError):
        return None


class HangWatchdog:
    def __init__(self, seconds: float, job_minutes: float, rank: int, world: int, device, debug_root: str,
                 flight_recorder: bool = False, store=_store, exit=os._exit):
        """`store`: a function of the timeout giving a store (or None); `exit`: how the process ends."""
        self.seconds, self.job_seconds = seconds, job_minutes * 60
        self.rank, self.world, self.device = rank, world, str(device)
        self.host = socket.gethostname()
        self.debug_root, self.flight_recorder = Path(debug_root), flight_recorder
        self.timeouts = CollectiveTimeouts(seconds, job_minutes)
        self.period = min(1.0, seconds / 10)
        self.stale_after = min(seconds / 2, 3.0)
        self._open_store, self._exit = store, exit
        self._store_timeout = timedelta(seconds=min(5.0, seconds))
        self._mark: Mark | None = None
        self._entries = 0
        self._error: BaseException | None = None  # a failed collective's error, for the report
        self._stop = threading.Event()
        self._firing = threading.Lock()
        self._threads: list[threading.Thread] = []

    # -- the main thread's side: plain assignments ---------------------------------------------------
    def entered(self, iteration: int) -> None:
        """The main thread starts the step of `iteration`."""
        self._entries += 1
        short = self._entries > 1  # the first step of a launch (warm-up, compilation) has the long limit
        if short:
            self.timeouts.short()
        self._mark = Mark(self._entries, iteration, 0, "step", short, time.monotonic())

    def job(self, job) -> None:
        """The main thread starts periodic job `job` (after the step it last entered)."""
        mark = self._mark
        if mark is None:
            return
        long = isinstance(job, LONG_JOBS)
        if long:
            self.timeouts.long()
        self._mark = Mark(mark.entries, mark.iteration, mark.phase_index + 1, job_name(job),
                          mark.short and not long, time.monotonic())

    def __enter__(self) -> "HangWatchdog":
        for target, name in ((self._watch, "hang-watchdog"), (self._publish, "hang-watchdog-publisher")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, kind, error, tb) -> None:
        if (isinstance(error, Exception) and not isinstance(error, MellamaError) and self._mark is not None
                and self.world > 1):
            self._after_failed_collective(error)
        self._stop.set()
        self.timeouts.long()  # the end of the run (a last save's wait, the group's shutdown) has the long one

    def _after_failed_collective(self, error: BaseException) -> None:
        if self._firing.locked():  # the watchdog is writing its report, and ends the process
            while True:
                time.sleep(1)
        self._error = error  # should the watchdog's limit run out meanwhile, its report shows the error
        time.sleep(1.5 * self.period)  # the live ranks' records catch up with where they are
        records = self._records()
        if records and not_arrived(records, time.time(), self.stale_after):
            self._fire(self._mark, "a collective failed: " + (str(error).strip().splitlines() or ["?"])[0],
                       records=records)

    # -- the threads ------------------------------------------------------------------------------
    def _record(self, mark: Mark) -> dict:
        now = time.time()
        return dict(entries=mark.entries, iteration=mark.iteration, phase_index=mark.phase_index, phase=mark.phase,
                    time=now, since=now - (time.monotonic() - mark.since), host=self.host, device=self.device,
                    pid=os.getpid())

    def _publish(self) -> None:
        store = self._open_store(self._store_timeout)
        if store is None:
            return
        key = f"rank{self.rank}"
        while True:
            mark = self._mark
            if mark is not None:
                try:
                    store.set(key, json.dumps(self._record(mark)))
                except (RuntimeError, OSError):  # the store went away: try again next time
                    pass
            if self._stop.wait(self.period):
                return

    def _watch(self) -> None:
        while True:
            mark = self._mark
            left = self.period
            if mark is not None:
                limit = self.seconds if mark.short else self.job_seconds
                left = mark.since + limit - time.monotonic()
                if left <= 0:
                    self._fire(mark, f"no progress for {limit:g} s")
                    return
            if self._stop.wait(min(self.period, left)):
                return

    def _records(self) -> dict[int, dict | None] | None:
        """Every rank's newest record (None for a rank with none); None where the store is out of reach."""
        store = self._open_store(self._store_timeout)
        if store is None:
            return None
        records: dict[int, dict | None] = {}
        try:
            for rank in range(self.world):
                key = f"rank{rank}"
                records[rank] = json.loads(store.get(key)) if store.check([key]) else None
        except (RuntimeError, OSError, ValueError):
            return None
        return records

    def _fire(self, mark: Mark, why: str, records=None) -> None:
        """Write the report, print its line, end the process; once, whichever thread gets here first."""
        if not self._firing.acquire(blocking=False):
            return
        try:
            # the stacks first, before the main thread can move (a collective's own timeout raising)
            with tempfile.TemporaryFile("w+") as stacks:
                faulthandler.dump_traceback(stacks, all_threads=True)
                stacks.seek(0)
                dumped = stacks.read()
            names = {t.ident: t.name for t in threading.enumerate()}
            dumped = "threads: " + ", ".join(f"{ident:#018x} {name}" for ident, name in names.items()) + "\n\n" + dumped
            self._report(mark, why, dumped, records if records is not None else self._records())
        except BaseException as failure:  # the process ends all the same
            print(f"hang watchdog, rank {self.rank}: the report failed: {failure!r}", file=sys.stderr, flush=True)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            self._exit(EXIT_CODE)

    def _report(self, mark: Mark, why: str, stacks: str, records) -> None:
        now = time.time()
        if records is not None:
            records[self.rank] = self._record(mark)  # its own, as of now
            late = not_arrived(records, now, self.stale_after)
            furthest = max((r["iteration"] for r in records.values() if r is not None), default=mark.iteration)
        else:
            late, furthest = None, mark.iteration
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        folder = self.debug_root / f"hang-iteration{furthest}" if attempt is None else \
            self.debug_root / f"hang-iteration{furthest}-attempt{attempt}"
        folder.mkdir(parents=True, exist_ok=True)
        if late is None:
            verdict = "the other ranks' progress is unknown (no store to read their records from)"
        elif late:
            verdict = "did not arrive: " + "; ".join(f"rank {rank} ({why_late})" for rank, why_late in late)
        else:
            verdict = "every rank is at the same place and alive: none is behind"
        with open(folder / f"rank{self.rank}.txt", "w") as out:
            out.write(f"rank {self.rank} ({self.host}, {self.device}), pid {os.getpid()}: {why} at iteration "
                      f"{mark.iteration}, {mark.phase} ({FLAG} {self.seconds:g})\n{verdict}\n\nevery rank's record:\n")
            for rank, record in sorted((records or {}).items()):
                out.write(f"  rank {rank}: {json.dumps(record)}\n")
            if self._error is not None:
                out.write("\nthe collective that failed:\n" + "".join(traceback.format_exception(self._error)))
            out.write("\nthe Python stacks of this process when the watchdog fired:\n" + stacks)
        if self.flight_recorder and (trace := dump_flight_recorder()):
            (folder / f"rank{self.rank}.flight_recorder.pkl").write_bytes(trace)
        print(f"hang watchdog, rank {self.rank} ({self.host}): {why} at iteration {mark.iteration} ({mark.phase}); "
              f"{verdict}; stacks in {folder}", file=sys.stderr, flush=True)


class NoWatchdog:
    """Without the flag: nothing watched, nothing changed."""

    def entered(self, iteration: int) -> None:
        pass

    def job(self, job) -> None:
        pass

    def __enter__(self) -> "NoWatchdog":
        return self

    def __exit__(self, kind, error, tb) -> None:
        pass


def hang_watchdog(cfg, rank: int, world: int, device) -> HangWatchdog | NoWatchdog:
    p = cfg.parallel
    if p.distributed_timeout_seconds_after_init is None:
        return NoWatchdog()
    root = Path(cfg.checkpoint.save) if cfg.checkpoint.save else Path.cwd()
    return HangWatchdog(p.distributed_timeout_seconds_after_init, p.distributed_timeout_minutes, rank, world, device,
                        str(root / "debug"), flight_recorder=p.flight_recorder_trace_buffer_size > 0)
