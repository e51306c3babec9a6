"""Collective timeouts after start-up, and the flight recorder (`--distributed-timeout-seconds-after-init`,
`--flight-recorder-*`).

Start-up needs a long timeout (`--distributed-timeout-minutes`: ranks wait for rank 0 to build the
data index, for a 70B checkpoint load); a step does not, and a rank that hangs in one should not keep
the job waiting half an hour. `CollectiveTimeouts` moves every process group of this process (the
default group and every device-mesh subgroup: torch's registry of groups, not a list of our own) to
the short timeout after the first step, and back to the long one around evaluations and saves.
torch sets a group's timeout only at creation in its public API; `_set_pg_timeout` (private, read
through `torch_private`) changes the default timeout of the group's gloo and NCCL backends, which
every later collective of that group uses. Where the installed torch lacks it, the run keeps the
start-up timeout and says so once.

The flight recorder keeps the last N collectives of each group (what was issued, what completed);
torch reads its settings from the environment when a group is created, so `configure_flight_recorder`
runs before `init_distributed`. NCCL also writes it on a timeout (TORCH_NCCL_DUMP_ON_TIMEOUT) to
`--flight-recorder-dump-path` + rank; the hang watchdog (`training/hang_watchdog.py`) dumps it into
its debug folder. gloo records too (tested here); the NCCL side is untested on this project's CPUs.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist

from ..torch_private import optional

# the environment torch reads at group creation; both spellings of each, older and newer releases
_BUFFER_SIZE = ("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_FR_BUFFER_SIZE")
_DUMP_FILE = ("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_FR_DUMP_TEMP_FILE")


def process_groups() -> list:
    """Every process group this process belongs to (the default one first), from torch's registry."""
    if not dist.is_initialized() or optional("_world.pg_map") is None:
        return [dist.group.WORLD] if dist.is_initialized() else []
    from torch.distributed import distributed_c10d

    # read each time: groups created after start-up (a mesh's flattened dims) are in it too
    return list(distributed_c10d._world.pg_map)


def set_collective_timeout(timeout: timedelta) -> int:
    """Every process group of this process: later collectives time out after `timeout`. Returns how
    many groups were changed (0 where torch lacks the setter)."""
    setter = optional("_set_pg_timeout")
    if setter is None:
        return 0
    changed = 0
    for group in process_groups():
        try:
            setter(timeout, group)
            changed += 1
        except (ValueError, RuntimeError):  # a group this rank is not part of
            continue
    return changed


class CollectiveTimeouts:
    """The short timeout for steps and the long one for start-up and periodic jobs; each switch is
    local (no collective) and made only when the wanted timeout changes."""

    def __init__(self, short_seconds: float, long_minutes: float):
        self.short_timeout, self.long_timeout = timedelta(seconds=short_seconds), timedelta(minutes=long_minutes)
        self.current = self.long_timeout  # what init_distributed gave every group
        self.unsupported = False

    def use(self, timeout: timedelta) -> None:
        if timeout == self.current or self.unsupported:
            return
        self.current = timeout
        if not set_collective_timeout(timeout) and optional("_set_pg_timeout") is None:
            self.unsupported = True
            print(f"--distributed-timeout-seconds-after-init: this torch cannot change a process group's timeout; "
                  f"collectives keep --distributed-timeout-minutes", flush=True)

    def short(self) -> None:
        self.use(self.short_timeout)

    def long(self) -> None:
        self.use(self.long_timeout)


def configure_flight_recorder(buffer_size: int, dump_path: str | None) -> None:
    """Before the process group exists: keep the last `buffer_size` collectives per group (0: off,
    torch's default), and have NCCL write them to `dump_path`<rank> when a collective times out."""
    if buffer_size <= 0:
        return
    for name in _BUFFER_SIZE:
        os.environ[name] = str(buffer_size)
    os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] = "1"
    if dump_path:
        for name in _DUMP_FILE:
            os.environ[name] = dump_path


def dump_flight_recorder() -> bytes | None:
    """The flight recorder's entries (a pickle, as torch's `fr_trace` tool reads), or None where this
    torch cannot dump it or nothing was recorded."""
    dump = optional("flight_recorder_dump")
    if dump is None:
        return None
    try:
        return dump()
    except RuntimeError:
        return None
