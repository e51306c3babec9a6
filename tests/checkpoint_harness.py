"""Train a stretch of global batches in one process or N gloo processes, loading and saving checkpoints.

`train_segment(argv, start, stop)` runs global batches [start, stop) of the same batch sequence
every layout sees (engine_harness.global_batches), after resuming from --load when `start` > 0,
and saves iteration `stop` to --save when `save` is set. Each rank returns its losses and its full
(unsharded) parameters.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine_harness import _free_port, global_batches, micro_batches_of


def train_segment(argv: list, start: int, stop: int, save: bool, meshes=None, dp_rank: int = 0,
                  dp_size: int = 1) -> dict:
    from megatron_mellama.checkpoint.manager import CheckpointManager
    from megatron_mellama.config import parse_config
    from megatron_mellama.training.engine import Engine

    world = dist.get_world_size() if dist.is_initialized() else 1
    cfg = parse_config(argv, world_size=world)
    engine = Engine(cfg, meshes)
    manager = CheckpointManager(cfg, engine)
    state = manager.load() if start else None
    if start:
        assert state is not None and state["iteration"] == start, state
    losses = [engine.step(micro_batches_of(b, cfg, dp_rank, dp_size)).loss
              for b in global_batches(cfg, stop)[start:stop]]
    if save:
        manager.save(stop, stop * cfg.train.global_batch_size, {"skipped_total": 0})
    manager.close()
    return dict(losses=losses, params=engine.full_state(), state=state)


def _worker(rank: int, world: int, port: int, argv: list, start: int, stop: int, save: bool, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from megatron_mellama.config import parse_config
        from megatron_mellama.parallel.mesh import ParallelDims

        dims = ParallelDims.from_config(parse_config(argv, world_size=world), world)
        result = train_segment(argv, start, stop, save, dims.build_mesh("cpu"), dims.coordinates(rank)["dp"], dims.dp)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        # a failed rank would leave the others waiting in a collective: say why and end them all
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    dist.barrier()
    dist.destroy_process_group()


def train_segment_distributed(argv: list, world: int, start: int, stop: int, save: bool, out_dir: str) -> list[dict]:
    mp.start_processes(_worker, args=(world, _free_port(), argv, start, stop, save, out_dir), nprocs=world,
                       join=True, start_method="spawn")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


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
