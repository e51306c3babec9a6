"""A save that fails (a full disk) stops every rank with one line, and leaves the save directory as
it was: no `iter_N.partial/`, no temporary file, `latest` naming the earlier checkpoint, which loads."""

import contextlib
import errno
import os
import re
import time
from unittest import mock

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem

from checkpoint_harness import load_with
from engine_harness import TINY, launch_gloo
from megatron_mellama.checkpoint import checksums, layout
from megatron_mellama.checkpoint.layout import CheckpointError
from megatron_mellama.checkpoint.manager import CheckpointManager
from megatron_mellama.config import parse_config
from megatron_mellama.training.engine import Engine

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

FREE = r"; [\d.]+ (GiB|MiB) free on that filesystem\)$"


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FullFile:
    """A file opened for writing on a full disk: it exists, and the first write fails."""

    def __init__(self, fh):
        self._fh = fh

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()

    def write(self, data):
        _enospc()

    def __getattr__(self, name):
        return getattr(self._fh, name)


def _open_failing(name: str):
    """`open`, but writing the temporary file of `name` (as fsync_write and write_checksums
    write it) hits a full disk."""
    def fake(path, mode="r", *args, **kwargs):
        fh = open(path, mode, *args, **kwargs)
        if "w" in mode and os.path.basename(str(path)).startswith(f"{name}.tmp"):
            return _FullFile(fh)
        return fh
    return fake


def _save_rng_failing(obj, path, *args, **kwargs):
    with open(path, "wb") as fh:
        fh.write(b"\x80partial")
    _enospc()


def full_disk(step: str):
    """The disk fills up at `step` of a save."""
    if step == "dcp":
        return mock.patch.object(dcp_filesystem, "_write_item", _enospc)
    if step == "rng":
        return mock.patch.object(torch, "save", _save_rng_failing)
    if step == "checksums":
        return mock.patch.object(checksums, "open", _open_failing(checksums.CHECKSUMS), create=True)
    name = {"train_state": layout.TRAIN_STATE, "latest": layout.LATEST}[step]
    return mock.patch.object(layout, "open", _open_failing(name), create=True)


def listing(root: str) -> list[str]:
    """Every file and directory under `root`, hidden ones included."""
    out = []
    for d, dirs, files in os.walk(root):
        rel = os.path.relpath(d, root)
        out += [os.path.normpath(os.path.join(rel, n)) + "/" for n in dirs]
        out += [os.path.normpath(os.path.join(rel, n)) for n in files]
    return sorted(out)


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


STEPS = {
    "train_state": "writing iter_0000002.partial/train_state.json",
    "rng": "writing iter_0000002.partial/rng/rank_00000.pt",
    "dcp": "writing iter_0000002.partial/__0_0.distcp",
    "checksums": "writing iter_0000002.partial/checksums.json",
    "latest": "writing latest",
}


@pytest.mark.parametrize("step", list(STEPS))
def test_a_full_disk_fails_the_save_in_one_line_and_leaves_nothing(tmp_path, step):
    root = str(tmp_path / "ckpt")
    cfg = parse_config(TINY + ["--save", root])
    checkpoints = CheckpointManager(cfg, Engine(cfg))
    checkpoints.save(1, 8)
    before = listing(root)
    with full_disk(step), pytest.raises(CheckpointError) as info:
        checkpoints.save(2, 16)
    line = str(info.value)
    assert re.match(rf"cannot save checkpoint iteration 2 to {re.escape(root)}: No space left on device "
                    rf"\({re.escape(STEPS[step])}{FREE}", line), line
    assert "\n" not in line
    assert listing(root) == before, "a failed save left files behind"
    assert _read(os.path.join(root, "latest")) == "1\n"
    assert load_with(["--load", root])["iteration"] == 1
    # space again: the next save works
    checkpoints.save(2, 16)
    checkpoints.close()
    assert _read(os.path.join(root, "latest")) == "2\n"


def test_a_failed_save_of_an_existing_iteration_keeps_it(tmp_path):
    root = str(tmp_path / "ckpt")
    cfg = parse_config(TINY + ["--save", root])
    checkpoints = CheckpointManager(cfg, Engine(cfg))
    checkpoints.save(1, 8)
    before = listing(root)
    # `latest` already names the iteration saved again: the new copy, complete, stays
    with full_disk("latest"), pytest.raises(CheckpointError, match=r"\(writing latest; "):
        checkpoints.save(1, 8)
    assert listing(root) == before
    assert load_with(["--load", root])["iteration"] == 1


def test_an_async_save_that_fails_leaves_nothing(tmp_path):
    root = str(tmp_path / "ckpt")
    cfg = parse_config(TINY + ["--save", root, "--async-save"])
    checkpoints = CheckpointManager(cfg, Engine(cfg))
    checkpoints.save(1, 8)
    checkpoints.wait()
    before = listing(root)
    with full_disk("dcp"), pytest.raises(CheckpointError) as info:
        checkpoints.save(2, 16)
        checkpoints.wait()
    assert re.match(rf"cannot save checkpoint iteration 2 to {re.escape(root)}: No space left on device "
                    rf"\(writing iter_0000002.partial/__0_0.distcp{FREE}", str(info.value)), str(info.value)
    assert listing(root) == before
    checkpoints.close()
    assert load_with(["--load", root])["iteration"] == 1


def test_pretrain_ends_a_failed_save_with_one_line(tmp_path, capsys):
    from megatron_mellama.pretrain import PROG, main

    root = str(tmp_path / "ckpt")
    run = ["--model", "tiny", "--mock-data", "--vocab-size", "256", "--seq-length", "32", "--micro-batch-size", "2",
           "--global-batch-size", "4", "--train-iters", "1", "--eval-iters", "0", "--num-workers", "0",
           "--save", root]
    with full_disk("dcp"):
        assert main(run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{PROG}: error: cannot save checkpoint iteration 1 to {root}: "
                                               "No space left on device (writing iter_0000001.partial/"), err
    assert listing(root) == []


# -- two ranks: a failure on one rank stops both with the same line -------------------------------
# (step, the rank whose disk is full) for the saves of iterations 2, 3, 4
FAILURES = [("rng", 1), ("dcp", 1), ("train_state", 0)]


def _failing_rank(rank, world, argv):
    from megatron_mellama.parallel.mesh import ParallelDims

    cfg = parse_config(argv, world_size=world)
    dims = ParallelDims.from_config(cfg, world)
    checkpoints = CheckpointManager(cfg, Engine(cfg, dims.build_mesh("cpu")))
    checkpoints.save(1, 8)
    before = listing(cfg.checkpoint.save)
    errors = []
    for iteration, (step, who) in enumerate(FAILURES, start=2):
        with full_disk(step) if rank == who else contextlib.nullcontext():
            try:
                checkpoints.save(iteration, 8 * iteration)
            except CheckpointError as exc:
                errors.append(str(exc))
            else:
                errors.append(None)
    checkpoints.close()
    return dict(errors=errors, before=before, after=listing(cfg.checkpoint.save))


def _spawn_with_deadline(body, world: int, args: tuple, out_dir: str, seconds: float) -> list:
    """engine_harness.spawn_gloo, but a rank still running after `seconds` fails the test."""
    ranks = launch_gloo(body, world, args, out_dir)
    deadline = time.monotonic() + seconds
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"a rank still runs after {seconds} s: it waits in a collective")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


@pytest.mark.slow
def test_a_full_disk_on_one_rank_stops_both_with_the_same_line(tmp_path):
    root = str(tmp_path / "ckpt")
    argv = TINY + ["--data-parallel-sharding", "optimizer", "--save", root]
    results = _spawn_with_deadline(_failing_rank, 2, (argv,), str(tmp_path), seconds=180)
    first, second = results[0]["errors"], results[1]["errors"]
    assert first == second, results
    names = ["iter_0000002.partial/rng/rank_00001.pt", "iter_0000003.partial/__1_0.distcp",
             "iter_0000004.partial/train_state.json"]
    for iteration, (line, name) in enumerate(zip(first, names), start=2):
        assert re.match(rf"cannot save checkpoint iteration {iteration} to {re.escape(root)}: No space left on "
                        rf"device \(writing {re.escape(name)}{FREE}", line or ""), line
    assert results[0]["after"] == results[0]["before"]
    assert _read(os.path.join(root, "latest")) == "1\n"
