"""A checkpoint directory on disk, and the atomic file operations that write it.

    SAVE/latest                       the iteration of the newest complete checkpoint (text)
    SAVE/iter_0000100/.metadata       DCP: model (top-level keys, e.g. `layers.3.mlp.up_proj.weight`)
    SAVE/iter_0000100/__*_*.distcp         and optimizer state (`optimizer.state.<name>.exp_avg`, ...)
    SAVE/iter_0000100/train_state.json     iteration, consumed samples, extras, LR schedule, loss
                                           scaler, world size and layout, the whole config
    SAVE/iter_0000100/rng/rank_00000.pt    each rank's python / numpy / torch (/ CUDA) RNG state
    SAVE/iter_0000100/checksums.json       size and CRC-32 of every other file (checksums.py), verified
                                           at every load before anything is read

A save writes `iter_N.partial/`, and only after every rank finished does rank 0 rename it to
`iter_N/` and then replace `latest`: a run killed mid-save leaves `latest` naming the previous
complete checkpoint and no incomplete directory under a final name. The checksum list is written
after every file (an async save's too) and before the rename and `latest`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

from ..config import Config
from ..errors import MellamaError

LATEST = "latest"
TRAIN_STATE = "train_state.json"
PARTIAL_SUFFIX = ".partial"
FORMAT_VERSION = 1
ITER_DIR = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(MellamaError, ValueError):
    """A checkpoint cannot be used; the message names the path and what is wrong."""


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> int | None:
    """The iteration `root/latest` names, or None when there is no `latest`."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as fh:
            raw = fh.read(64)
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc.strerror or exc})") from None
    text = raw.decode("ascii", errors="replace").strip()
    if not text.isdigit() or not text.isascii():
        raise CheckpointError(f"{path}: expected an iteration number, found {raw[:40]!r}")
    return int(text)


def saved_iterations(root: str) -> list[int]:
    """The iterations of the checkpoint directories under `root`, oldest first."""
    return sorted(int(m.group(1)) for m in map(ITER_DIR.match, os.listdir(root)) if m)


def rng_file(ckpt: str, rank: int) -> str:
    """Where rank `rank` keeps its random-number-generator state in checkpoint `ckpt`."""
    return os.path.join(ckpt, "rng", f"rank_{rank:05d}.pt")


def read_train_state(ckpt: str) -> dict:
    """`ckpt/train_state.json`, checked to hold what `load` reads; CheckpointError otherwise."""
    path = os.path.join(ckpt, TRAIN_STATE)
    try:
        with open(path) as fh:
            saved = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable train state ({type(exc).__name__}: {exc})") from None
    missing = [k for k in ("iteration", "consumed_samples", "scheduler", "scaler", "config")
               if not isinstance(saved, dict) or k not in saved]
    if missing or "model" not in saved["config"]:
        raise CheckpointError(f"{path}: unreadable train state (missing {', '.join(missing) or 'config.model'})")
    return saved


def write_train_state(ckpt_dir: str, *, iteration: int, consumed_samples: int, config: Config,
                      extra: dict | None = None, world_size: int = 1, layout: dict | None = None,
                      scheduler: dict | None = None, scaler: dict | None = None, data: dict | None = None) -> None:
    """`train_state.json`: everything in a checkpoint but its tensors, in the one format `load` reads.

    Empty scheduler and scaler states mark a weights-only checkpoint (one imported from elsewhere).
    `data` (`data/identity.py`): what the sample sequence `consumed_samples` indexes depends on."""
    state = dict(format=FORMAT_VERSION, iteration=iteration, consumed_samples=consumed_samples,
                 extra=dict(extra or {}), world_size=world_size, layout=layout or dict(tp=1, pp=1, dp=1),
                 scheduler=scheduler or {}, scaler=scaler or {}, config=dataclasses.asdict(config))
    if data is not None:
        state["data"] = data
    fsync_write(os.path.join(ckpt_dir, TRAIN_STATE), json.dumps(state, indent=1))


def write_latest(root: str, iteration: int) -> None:
    """Point `root/latest` at `iteration`, atomically: the last step of every save."""
    fsync_write(os.path.join(root, LATEST), f"{iteration}\n")


def fsync_write(path: str, text: str) -> None:
    """Write `text` to `path` atomically: a reader sees the old file or the whole new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # a full disk must not also keep the half-written temporary file
        _remove_file(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def _remove_file(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def fsync_dir(path: str) -> None:
    # makes renames inside `path` durable across a machine crash, not only a process crash
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(partial: str, final: str) -> None:
    """Rename `partial` to `final`. An existing `final` (the same iteration saved again) stays
    until the rename succeeded, and comes back if it failed."""
    if not os.path.exists(final):
        os.rename(partial, final)
        return
    stale = final + ".old"
    shutil.rmtree(stale, ignore_errors=True)
    os.rename(final, stale)
    try:
        os.rename(partial, final)
    except OSError:
        os.rename(stale, final)
        raise
    shutil.rmtree(stale, ignore_errors=True)


def remove_unnamed(root: str, iteration: int) -> None:
    """After `latest` failed to move: checkpoint `iteration` goes unless `latest` names it anyway
    (it had, or the failure came after the rename). Nothing resumes from a checkpoint `latest`
    does not name, and a full disk needs the space back."""
    try:
        named = latest_iteration(root)
    except CheckpointError:
        named = None
    if named != iteration:
        shutil.rmtree(checkpoint_dir(root, iteration), ignore_errors=True)


def bytes_under(path: str) -> int:
    """Total size of the files under `path` (every rank's, on a shared file system)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
