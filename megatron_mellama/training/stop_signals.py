"""Catch the signals schedulers send before ending a job (SIGTERM, SIGUSR1), as early as possible.

`pretrain` installs the catcher before it does anything else. What a signal does depends on when it
arrives:

- during start-up (from the install until the run is about to take its first step, see
  `RunControl.preempted`), SIGTERM and SIGINT end the process at once with one line on stderr and
  exit code 128 + the signal's number: nothing has been trained, so nothing is lost, and a trainer
  blocked in process-group set-up or a barrier (a C call that does not return to Python, where a
  handler would run) ends in a moment instead of when its launcher gives up on it (torchrun kills
  its trainers 30 s after SIGTERM, before each restart too);
- SIGUSR1 during start-up is kept: the run stops before its first iteration (nothing to save);
- after start-up, SIGTERM and SIGUSR1 are kept and the training loop acts on them at the next step
  boundary, where a checkpoint can be written (`RunControl`); SIGINT keeps Python's default.

The start-up exit does not need the main thread: Python's C-level handler writes each signal's
number to a wakeup pipe (`signal.set_wakeup_fd`) wherever the main thread is, and a watcher thread
reading the pipe ends the process. Data-loader workers ignore SIGTERM and SIGUSR1 (`data/loader.py`).
"""

from __future__ import annotations

import os
import signal
import threading

from ..data.loader import STOP_SIGNALS

# signals that end a process still in start-up; SIGUSR1 ("save and stop") is kept instead
START_UP_EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_watching: set["StopSignals"] = set()


def _forget_the_pipe_in_a_forked_child() -> None:
    # a child forked during start-up inherits the wakeup pipe, not the watcher: a signal it
    # receives must not be read by the parent's watcher as the parent's own
    if _watching:
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:  # forked from a thread other than the main one
            pass


os.register_at_fork(after_in_child=_forget_the_pipe_in_a_forked_child)


class StopSignals:
    """Remembers the last stop signal received while installed; ends the process on SIGTERM or
    SIGINT until `end_start_up`."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}
        self._lock = threading.Lock()
        self._starting = False
        self._pipe: tuple[int, int] | None = None
        self._previous_wakeup_fd = -1

    def _handle(self, signum, frame) -> None:
        # Only a flag: raising here would unwind from an arbitrary point of the step (possibly
        # inside a collective, leaving other ranks hanging), and printing can fail with a
        # reentrant-call error if the signal lands while the main thread writes to stdout.
        self.received = signum

    def _handle_start_up_only(self, signum, frame) -> None:
        # SIGINT after start-up: Python's own behaviour (KeyboardInterrupt) once the watcher is gone
        if self._pipe is None:
            raise KeyboardInterrupt

    def install(self) -> "StopSignals":
        # Python only lets the main thread install handlers; elsewhere (a test runner's worker
        # thread, say) the run simply cannot be preempted gracefully.
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return self
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle_start_up_only)
        self._watch_start_up()
        return self

    def _watch_start_up(self) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        try:
            self._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:  # not the main thread of the main interpreter
            os.close(read_fd)
            os.close(write_fd)
            return
        self._pipe = (read_fd, write_fd)
        self._starting = True
        _watching.add(self)
        threading.Thread(target=self._watch, args=(read_fd,), name="start-up-signals", daemon=True).start()

    def _watch(self, read_fd: int) -> None:
        try:
            while chunk := os.read(read_fd, 64):
                for signum in chunk:
                    with self._lock:
                        if self._starting and signum in START_UP_EXIT_SIGNALS:
                            self._exit_now(signum)
        finally:
            os.close(read_fd)

    @staticmethod
    def _exit_now(signum: int) -> None:
        name = signal.Signals(signum).name
        rank = f"rank {os.environ['RANK']}: " if "RANK" in os.environ else ""
        line = (f"{rank}received {name} during start-up, before the first iteration: exiting now "
                f"(nothing trained, nothing to save)\n")
        os.write(2, line.encode())
        os._exit(128 + signum)

    def end_start_up(self) -> None:
        """From now on SIGTERM is kept for the next step boundary (and SIGINT is Python's default)."""
        with self._lock:
            self._starting = False
        self._stop_watching()

    def _stop_watching(self) -> None:
        if self._pipe is None:
            return
        read_fd, write_fd = self._pipe
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        self._pipe = None
        _watching.discard(self)
        os.close(write_fd)  # the watcher reads end-of-file and closes its end
        if signal.SIGINT in self._previous:
            signal.signal(signal.SIGINT, self._previous.pop(signal.SIGINT))

    def restore(self) -> None:
        with self._lock:
            self._starting = False
        self._stop_watching()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
