"""The folders and files a run will write, created and tried before any work.

A path that cannot be written (a missing parent that cannot be made, no permission, a file where a
folder is expected) ends the run at start-up with one line naming the flag, instead of a traceback
after the first iteration or the first save, hours into a job.
"""

from __future__ import annotations

import os
import tempfile

from .errors import ConfigError
from .sections import Config


def _writable_dir(flag: str, path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        # a real write: permission bits do not tell about read-only mounts or quotas
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None


def _writable_file(flag: str, path: str) -> None:
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: is a directory; expected a file to append to")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None


def prepare_output_paths(cfg: Config, rank: int | None = None) -> None:
    """Create (or check) every output path of `cfg` that this rank writes: `--save` and
    `--data-cache-path` on every rank, `--log-file` and `--tensorboard-dir` on rank 0 only (the
    only writer, whose node may be the only one that has the folder)."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if cfg.checkpoint.save:
        _writable_dir("--save", cfg.checkpoint.save)
    if cfg.data.data_cache_path:
        _writable_dir("--data-cache-path", cfg.data.data_cache_path)
    if rank == 0:
        if cfg.logging.tensorboard_dir:
            _writable_dir("--tensorboard-dir", cfg.logging.tensorboard_dir)
        if cfg.logging.log_file:
            _writable_file("--log-file", cfg.logging.log_file)
