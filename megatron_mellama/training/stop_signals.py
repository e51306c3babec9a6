"""Catch the signals schedulers send before ending a job (SIGTERM, SIGUSR1), as early as possible.

`pretrain` installs the catcher before it does anything else, so a signal that arrives during
minutes of start-up (a 70B checkpoint load) is kept rather than killing the process; the training
loop acts on it at the first step boundary (`RunControl`). Data-loader workers ignore the same
signals (`data/loader.py`).
"""

from __future__ import annotations

import signal
import threading

from ..data.loader import STOP_SIGNALS


class StopSignals:
    """Remembers the last stop signal received while installed."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        # Only a flag: raising here would unwind from an arbitrary point of the step (possibly
        # inside a collective, leaving other ranks hanging), and printing can fail with a
        # reentrant-call error if the signal lands while the main thread writes to stdout.
        self.received = signum

    def install(self) -> "StopSignals":
        # Python only lets the main thread install handlers; elsewhere (a test runner's worker
        # thread, say) the run simply cannot be preempted gracefully.
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if sig not in self._previous:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
