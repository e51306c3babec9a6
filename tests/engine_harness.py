"""Run the engine for a few steps in one process or in N gloo processes, on the same global batches.

Each multi-process rank writes its losses, grad norms and full (unsharded) parameters to a file;
the test merges the pipeline stages and compares with the single-process reference.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
import uuid
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TINY = ["--model", "tiny", "--vocab-size", "128", "--seq-length", "16", "--num-layers", "4",
        "--lr", "1e-3", "--weight-decay", "0.1", "--clip-grad", "1.0", "--lr-decay-style", "constant",
        "--seed", "11", "--micro-batch-size", "2", "--global-batch-size", "8"]


def global_batches(cfg, steps: int, seed: int = 0, eod_every: int = 5) -> list[dict]:
    """`steps` global batches of random tokens, the same for every layout.

    With --reset-position-ids (packed documents) about one token in `eod_every` is the EOD (the
    vocabulary's last id), and the batch is what the loader makes of megatron-core's samples:
    position ids restarting after each EOD, the --eod-mask-loss loss mask, the document ids."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        data = torch.randint(0, cfg.model.vocab_size, (cfg.train.global_batch_size, cfg.seq_length + 1), generator=g)
        mask = torch.ones(cfg.train.global_batch_size, cfg.seq_length)
        mask[0, -3:] = 0  # a few masked tokens, so the token count is not simply batch x seq
        batch = dict(tokens=data[:, :-1], labels=data[:, 1:], loss_mask=mask)
        if cfg.data.reset_position_ids:
            batch = packed_documents(cfg, data, mask, g, eod_every)
        batches.append(batch)
    return batches


def packed_documents(cfg, data: torch.Tensor, mask: torch.Tensor, g: torch.Generator, eod_every: int) -> dict:
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    from megatron_mellama.data.loader import collate_for

    eod = cfg.model.vocab_size - 1
    data = torch.where(torch.rand(data.shape, generator=g) < 1 / eod_every, eod, data)
    samples = []
    for row, row_mask in zip(data, mask):
        tokens = row[:-1]
        _, loss_mask, position_ids = _get_ltor_masks_and_position_ids(
            tokens, eod, cfg.data.reset_position_ids, cfg.data.reset_attention_mask, cfg.data.eod_mask_loss, False)
        samples.append(dict(tokens=tokens, labels=row[1:], loss_mask=loss_mask * row_mask, position_ids=position_ids))
    return collate_for(cfg)(samples)


def micro_batches_of(batch: dict, cfg, dp_rank: int, dp_size: int) -> list[dict]:
    """This DP rank's contiguous slice of a global batch, cut into micro-batches (as the loader does)."""
    share = cfg.train.global_batch_size // dp_size
    mbs = cfg.train.micro_batch_size
    lo = dp_rank * share
    return [{k: v[i:i + mbs] for k, v in batch.items()} for i in range(lo, lo + share, mbs)]


def loader_batches(cfg, steps: int, dp_rank: int, dp_size: int) -> list[list[dict]]:
    """This DP rank's micro-batches of the run's first `steps` global batches, from `--data-path`
    through the datasets and loader a training run uses."""
    from megatron_mellama.data.datasets import build_datasets
    from megatron_mellama.data.loader import train_batches

    stream = train_batches(cfg, build_datasets(cfg).train, consumed_samples=0, dp_rank=dp_rank, dp_size=dp_size)
    try:
        return [next(stream) for _ in range(steps)]
    finally:
        stream.close()


def run_steps(cfg, engine, steps: int, dp_rank: int = 0, dp_size: int = 1) -> dict:
    """`steps` optimizer steps on random global batches, or on the run's own data when it has a
    `--data-path`; then the validation loss of the first batch."""
    losses, norms, skipped = [], [], []
    if cfg.data.data_path:
        batches = loader_batches(cfg, steps, dp_rank, dp_size)
    else:
        batches = [micro_batches_of(batch, cfg, dp_rank, dp_size) for batch in global_batches(cfg, steps)]
    for micro_batches in batches:
        result = engine.step(micro_batches)
        losses.append(result.loss)
        norms.append(result.grad_norm)
        skipped.append(result.skipped)
    eval_loss = engine.evaluate(batches[0])
    return dict(losses=losses, grad_norms=norms, skipped=skipped, eval_loss=eval_loss, params=engine.full_state())


def reference(argv: list, steps: int) -> dict:
    from megatron_mellama.config import parse_config
    from megatron_mellama.training.engine import Engine

    cfg = parse_config(argv)
    return run_steps(cfg, Engine(cfg), steps)


def store_address() -> str:
    """A new file store for one process group's rendezvous (the ranks remove it as they end).

    A TCP port found free by binding and releasing it can be taken by a neighbouring test before
    the ranks bind it; a file of its own cannot (gloo's ranks then connect on ports the kernel gives
    them). It lies outside the test's folder, which some tests list."""
    return f"file://{os.path.join(tempfile.gettempdir(), f'gloo-store-{uuid.uuid4().hex}')}"


def _gloo_rank(rank: int, world: int, store: str, out_dir: str, body, args: tuple, env: dict) -> None:
    os.environ.clear()
    os.environ.update(env, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        torch.save(body(rank, world, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        # a failed rank would leave the others waiting in a collective: say why and end them all
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    dist.barrier()
    dist.destroy_process_group()


# The modules every rank needs, imported once per test process by the server the ranks are forked
# from; a spawned rank would import them anew (seconds of CPU per rank, per launch).
RANK_PRELOAD = ["torch", "torch.distributed", "megatron_mellama.training.engine", "megatron_mellama.checkpoint.manager",
                # the Megatron-LM checkpoint fixtures build megatron-core models in every rank
                "megatron.core.models.gpt", "megatron.core.dist_checkpointing", "megatron.core.optimizer"]


def launch_gloo(body, world: int, args: tuple, out_dir: str):
    """`world` gloo processes running `body(rank, world, *args)`, not joined (torch's ProcessContext).

    Each rank is a fresh process with no process group, forked from a server that has only imported
    `RANK_PRELOAD`, and takes this process's environment as it is now."""
    context = mp.get_context("forkserver")
    # the server starts at the first launch and reads this once; OpenMP reads the thread count when
    # torch is imported there: more threads than cores slow ranks that share a small machine
    context.set_forkserver_preload(RANK_PRELOAD)
    with mock.patch.dict(os.environ, OMP_NUM_THREADS="1"):
        env = dict(os.environ)
        return mp.start_processes(_gloo_rank, args=(world, store_address(), out_dir, body, args, env), nprocs=world,
                                  join=False, start_method="forkserver")


def spawn_gloo(body, world: int, args: tuple, out_dir: str) -> list:
    """`body(rank, world, *args)` in `world` gloo processes; returns each rank's result, in rank order.

    `body` must be a module-level function (the ranks unpickle it by name)."""
    ranks = launch_gloo(body, world, args, out_dir)
    while not ranks.join():
        pass
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


def rank_engine(rank: int, world: int, argv: list):
    """This gloo rank's share of the layout `argv` describes: (config, engine, its coordinates, DP size)."""
    from megatron_mellama.config import parse_config
    from megatron_mellama.parallel.mesh import ParallelDims
    from megatron_mellama.training.engine import Engine

    cfg = parse_config(argv, world_size=world)
    dims = ParallelDims.from_config(cfg, world)
    return cfg, Engine(cfg, dims.build_mesh("cpu")), dims.coordinates(rank), dims.dp


def _engine_rank(rank: int, world: int, argv: list, steps: int) -> dict:
    cfg, engine, coords, dp_size = rank_engine(rank, world, argv)
    result = run_steps(cfg, engine, steps, coords["dp"], dp_size)
    result["coords"] = coords
    return result


def run_distributed(argv: list, world: int, steps: int, out_dir: str) -> list[dict]:
    return spawn_gloo(_engine_rank, world, (argv, steps), out_dir)


def _engine_layouts_rank(rank: int, world: int, argvs: dict, steps: int) -> dict:
    return {key: _engine_rank(rank, world, argv, steps) for key, argv in argvs.items()}


def run_distributed_layouts(argvs: dict, world: int, steps: int, out_dir: str) -> dict:
    """`run_distributed` for several layouts of one world size, one after another in one launch of
    `world` processes (each process starts torch once, not once per layout): {key: every rank's
    results}, for `argvs` {key: argv}."""
    ranks = spawn_gloo(_engine_layouts_rank, world, (argvs, steps), out_dir)
    return {key: [r[key] for r in ranks] for key in argvs}


def run_layouts_by_world(layouts: dict, steps: int, tmp_path_factory) -> dict:
    """`run_distributed_layouts` over layouts of several world sizes, one launch per world size:
    {key: every rank's results}, for `layouts` {key: (world size, argv)}."""
    runs = {}
    for world in sorted({world for world, _ in layouts.values()}):
        argvs = {key: argv for key, (w, argv) in layouts.items() if w == world}
        runs.update(run_distributed_layouts(argvs, world, steps, str(tmp_path_factory.mktemp(f"world{world}"))))
    return runs


def merged_params(results: list[dict]) -> dict:
    """The full model from every pipeline stage (all ranks of a stage hold the same full values)."""
    params = {}
    for r in results:
        params.update(r["params"])
    return params


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def assert_matches(results, ref, rtol):
    """Every rank's losses, grad norms and validation loss, and the merged final parameters, equal
    the single-process reference `ref` within `rtol`, and no step was skipped."""
    for r in results:
        for got, want in zip(r["losses"], ref["losses"]):
            assert rel(got, want) <= rtol, (r["coords"], r["losses"], ref["losses"])
        for got, want in zip(r["grad_norms"], ref["grad_norms"]):
            assert rel(got, want) <= rtol, (r["coords"], r["grad_norms"], ref["grad_norms"])
        assert not any(r["skipped"])
        assert rel(r["eval_loss"], ref["eval_loss"]) <= rtol
    params = merged_params(results)
    assert set(params) == set(ref["params"])
    for name, want in ref["params"].items():
        # relative difference of the whole tensor: Adam's normalised update turns the last bit
        # of a near-zero gradient into a full lr-sized step for that one element
        diff = ((params[name] - want).norm() / want.norm()).item()
        assert diff <= rtol, (name, diff)


if __name__ == "__main__":  # python tests/engine_harness.py WORLD flags...: a quick manual check
    world = int(sys.argv[1])
    with tempfile.TemporaryDirectory() as d:
        res = run_distributed(TINY + sys.argv[2:], world, 3, d)
        ref = reference(TINY, 3)
        print("dist", res[0]["losses"], res[0]["grad_norms"])
        print("ref ", ref["losses"], ref["grad_norms"])
