"""Whose checkpoints a run may write over: the `--save` guard, checked before any work.

A run saves `iter_N/` for its own iterations and moves `latest` to them. Pointed at a directory
that already holds checkpoints, a run that does not continue them (`--finetune` from them or from
elsewhere, a fresh run, a resume of another directory, a resume from an older iteration) replaces
their iterations of the same number, moves `latest` back to its own, and with `--keep-last`
deletes the rest. Megatron-LM and torchtitan write over them without a word; here such a run is
refused unless `--overwrite-save` says it is meant. The one run that may write there anyway is
the plain resume of that directory: `--load` naming it (or its newest iteration), no `--finetune`.
"""

from __future__ import annotations

import os
import re

from ..config import Config
from .layout import CheckpointError, checkpoint_dir, latest_iteration
from .resume import checkpoint_to_load

_ITERATION = re.compile(r"^iter_(\d{7,})$")
_OVERRIDE = "save elsewhere, or pass --overwrite-save to write over them"


def saved_iterations(root: str) -> list[int]:
    """The iterations of the complete checkpoints in `root` (its `iter_N` directories), ascending."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    found = (_ITERATION.match(n) for n in names)
    return sorted(int(m.group(1)) for m in found if m and os.path.isdir(os.path.join(root, m.group(0))))


def _same(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _holdings(root: str, latest: int | None, saved: list[int]) -> str:
    if latest is not None:
        return f"the checkpoints of a run (latest: iteration {latest})"
    return f"checkpoints ({', '.join(f'iter_{i:07d}' for i in saved[-3:])}) and no 'latest' file"


def check_save_root(cfg: Config) -> None:
    """Raise CheckpointError (one line) when this run would write over checkpoints in --save that it
    does not continue; see the module's docstring."""
    c = cfg.checkpoint
    root = c.save
    if not root or c.overwrite_save or not os.path.isdir(root):
        return
    latest = latest_iteration(root)
    saved = saved_iterations(root)
    if latest is None and not saved:
        return
    held = f"--save {root} already holds {_holdings(root, latest, saved)}"
    if not c.load:
        raise CheckpointError(f"{held}; this run loads nothing (no --load) and would write over them: resume "
                              f"them with --load {root}, or {_OVERRIDE}")
    if c.finetune:
        raise CheckpointError(f"{held}; --finetune starts a new run at iteration 0 whose checkpoints would write "
                              f"over them (to resume that run: --load {root} without --finetune); {_OVERRIDE}")
    resumed = checkpoint_to_load(cfg)
    if latest is not None and resumed is not None and _same(resumed, checkpoint_dir(root, latest)):
        return
    if resumed is not None and _same(os.path.dirname(os.path.normpath(resumed)), root):
        raise CheckpointError(f"{held}; --load {c.load} resumes from an older one, and this run's checkpoints "
                              f"would write over the later ones: resume with --load {root}, or {_OVERRIDE}")
    raise CheckpointError(f"{held}; --load {c.load} is another run, whose continuation would write over them: "
                          f"{_OVERRIDE}")
