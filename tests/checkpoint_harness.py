"""Train a stretch of global batches in one process or N gloo processes, loading and saving checkpoints.

`train_segment(argv, start, stop)` runs global batches [start, stop) of the same batch sequence
every layout sees (engine_harness.global_batches), after resuming from --load when `start` > 0,
and saves iteration `stop` to --save when `save` is set. Each rank returns its losses and its full
(unsharded) parameters.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import torch.distributed as dist

from engine_harness import global_batches, micro_batches_of, spawn_gloo


def train_segment(argv: list, start: int, stop: int, save: bool, meshes=None, dp_rank: int = 0,
                  dp_size: int = 1) -> dict:
    from megatron_mellama.checkpoint.manager import CheckpointManager
    from megatron_mellama.checkpoint.resume import checkpoint_to_load
    from megatron_mellama.config import parse_config
    from megatron_mellama.training.engine import Engine

    world = dist.get_world_size() if dist.is_initialized() else 1
    cfg = parse_config(argv, world_size=world)
    # as the training loop does: no initialisation when a checkpoint provides the weights
    ckpt = checkpoint_to_load(cfg) if start else None
    engine = Engine(cfg, meshes, initialise=ckpt is None)
    if ckpt is not None:
        poison(engine)
    manager = CheckpointManager(cfg, engine)
    state = manager.load(ckpt) if start else None
    if start:
        assert state is not None and state["iteration"] == start, state
    losses = [engine.step(micro_batches_of(b, cfg, dp_rank, dp_size)).loss
              for b in global_batches(cfg, stop)[start:stop]]
    if save:
        manager.save(stop, stop * cfg.train.global_batch_size, {"skipped_total": 0})
    manager.close()
    return dict(losses=losses, params=engine.full_state(), state=state)


def poison(engine) -> None:
    """NaN in every parameter of an uninitialised engine: a weight a load fails to set shows."""
    import torch

    with torch.no_grad():
        for module in engine.modules:
            for param in module.parameters():
                param.fill_(float("nan"))


def _segment_rank(rank: int, world: int, argv: list, start: int, stop: int, save: bool) -> dict:
    from megatron_mellama.config import parse_config
    from megatron_mellama.parallel.mesh import ParallelDims

    dims = ParallelDims.from_config(parse_config(argv, world_size=world), world)
    return train_segment(argv, start, stop, save, dims.build_mesh("cpu"), dims.coordinates(rank)["dp"], dims.dp)


def train_segment_distributed(argv: list, world: int, start: int, stop: int, save: bool, out_dir: str) -> list[dict]:
    return spawn_gloo(_segment_rank, world, (argv, start, stop, save), out_dir)


if __name__ == "__main__":
    # python tests/checkpoint_harness.py SAVE_DIR: save iteration 1, then hang inside the save of
    # iteration 2 after its data files are written (the crash test kills it there)
    import torch.distributed.checkpoint as dcp

    from engine_harness import TINY

    save_dir = sys.argv[1]
    argv = TINY + ["--save", save_dir]
    train_segment(argv, 0, 1, save=True)
    original_finish = dcp.FileSystemWriter.finish

    def finish_then_hang(self, metadata, results):
        open(os.path.join(save_dir, "data-written"), "w").close()
        import time

        time.sleep(600)
        return original_finish(self, metadata, results)

    dcp.FileSystemWriter.finish = finish_then_hang
    train_segment(argv, 0, 2, save=True)


def load_with(flags: list) -> dict | None:
    """A single-process engine of the tiny model built from `flags`, then `CheckpointManager.load()`."""
    from engine_harness import TINY
    from megatron_mellama.checkpoint.manager import CheckpointManager
    from megatron_mellama.config import parse_config
    from megatron_mellama.training.engine import Engine

    cfg = parse_config(TINY + flags)
    return CheckpointManager(cfg, Engine(cfg)).load()


def copy_checkpoint(src, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def drop_checksums(root) -> None:
    """An edited file no longer matches its checksum: forget them, as a checkpoint from before them."""
    for dirpath, _, files in os.walk(root):
        if "checksums.json" in files:
            os.remove(os.path.join(dirpath, "checksums.json"))


def edit_train_state(root, iteration: int, edit) -> None:
    """Apply `edit(state)` to `root/iter_N/train_state.json` in place, and drop the checksums it breaks."""
    path = os.path.join(str(root), f"iter_{iteration:07d}", "train_state.json")
    with open(path) as fh:
        state = json.load(fh)
    edit(state)
    with open(path, "w") as fh:
        json.dump(state, fh)
    drop_checksums(root)
