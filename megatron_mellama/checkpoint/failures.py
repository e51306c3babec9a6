"""How a failed save or load reads: one line naming the step or file, the error and, for a full disk
or quota, the free space; never DCP's traceback of every rank.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil

from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem

from .layout import CheckpointError


def root_cause(exc: BaseException) -> BaseException:
    """The first rank's original exception inside DCP's CheckpointException."""
    if isinstance(exc, CheckpointException) and exc.failures:
        first = exc.failures[min(exc.failures)]
        return first[0] if isinstance(first, tuple) else first
    return exc


class StepFailed(Exception):
    """A step of a save failed on this rank; the message is the line every rank raises."""


def failure_line(root: str, iteration: int, step: str, exc: BaseException, name_file: bool) -> str:
    """`cannot save checkpoint iteration N to ROOT: REASON (STEP; X GiB free on that filesystem)`.

    `name_file`: the step wrote several files, so the one the error names (if any) says more."""
    cause = root_cause(exc)
    if isinstance(cause, OSError):
        reason = cause.strerror or str(cause)
        if name_file and cause.filename:
            step = f"writing {relative(os.fspath(cause.filename), root)}"
    else:
        reason = f"{type(cause).__name__}: {cause}"
    if getattr(cause, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        try:
            step += f"; {_size_text(shutil.disk_usage(root).free)} free on that filesystem"
        except OSError:
            pass
    return " ".join(f"cannot save checkpoint iteration {iteration} to {root}: {reason} ({step})".split())


@contextlib.contextmanager
def failing_as(root: str, iteration: int, step: str, name_file: bool):
    try:
        yield
    except StepFailed:
        raise
    except (Exception, CheckpointException) as exc:
        raise StepFailed(failure_line(root, iteration, step, exc, name_file)) from exc


def relative(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else rel


def _size_text(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def attempt(fn, *args):
    """`fn(*args)`, or the `StepFailed` it raised: a rank must reach the agreement that follows
    whether its step failed or not."""
    try:
        return fn(*args)
    except StepFailed as exc:
        return exc


class NamingFileSystem(FileSystem):
    """DCP's file system, but an error while writing a file names it (a failed write() does not)."""

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        try:
            with super().create_stream(path, mode) as stream:
                yield stream
        except OSError as exc:
            if exc.filename is None:
                exc.filename = os.fspath(path)
            raise


def explain_load_failure(exc: BaseException, ckpt: str) -> CheckpointError:
    """The one line for an error DCP raised while reading `ckpt`: a tensor's shape, a missing key,
    or an unreadable file."""
    cause = root_cause(exc)
    text = str(cause)
    size = re.search(r"Size mismatch between saved (.+?) and current: (.+?) for (\S+)", text)
    if size:
        saved, current, key = size.groups()
        return CheckpointError(f"{ckpt}: tensor {key} has shape {list(_shape_of(saved))} in the checkpoint "
                               f"but {list(_shape_of(current))} in this model")
    key = re.search(r"Missing key in checkpoint state_dict: (\S+?)\.?$", text, re.M)
    if key:
        hint = " (a weights-only checkpoint? use --finetune or --no-load-optim)" if key.group(1).startswith(
            "optimizer.") else ""
        return CheckpointError(f"{ckpt}: the checkpoint has no {key.group(1)}{hint}")
    first = text.strip().splitlines()[-1] if text.strip() else ""
    return CheckpointError(f"{ckpt}: unreadable or corrupt checkpoint ({type(cause).__name__}: {first})")


def _shape_of(text: str) -> tuple:
    """`torch.Size([64, 32])` (as DCP prints it) -> (64, 32)."""
    return tuple(int(x) for x in re.findall(r"\d+", text))
