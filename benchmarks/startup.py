"""Start-up from an imported checkpoint under tensor parallelism: bytes each rank reads, and the
engine's build with and without random initialisation, in one run.

    python benchmarks/startup.py                      # 4 layers, hidden 512, vocab 8192, bf16, TP2 (~45 MB)
    python benchmarks/startup.py --tp 4 --hidden 1024

Writes a random bf16 LLaMA2-shaped safetensors checkpoint, imports it with hf_to_mellama's defaults
(the source's dtype is kept), then starts `--tp` gloo processes that each build the engine and load
the checkpoint with --finetune, as `pretrain` does, once with DCP's own FileSystemReader and once with
ours (checkpoint/reader.py). Bytes read per rank are counted at the file streams and by the reader
(`counted`), and cross-checked with the process's read syscalls (`rchar` of /proc/self/io, which also
counts anything else the process read meanwhile). Ratios are against the checkpoint's size on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from convert import write_source  # noqa: E402  the conversion benchmark's random bf16 LLaMA folder


def _rchar() -> int:
    try:
        with open("/proc/self/io") as fh:
            return int(next(line.split()[1] for line in fh if line.startswith("rchar:")))
    except (OSError, StopIteration):
        return -1


def _rank(rank: int, world: int, argv: list, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import megatron_mellama.checkpoint.manager as manager_module
    from megatron_mellama.checkpoint.manager import CheckpointManager
    from megatron_mellama.checkpoint.resume import checkpoint_to_load
    from megatron_mellama.checkpoint.reader import CountingFileSystem, ShardReader
    from megatron_mellama.config import parse_config
    from megatron_mellama.parallel.mesh import ParallelDims
    from megatron_mellama.training.engine import Engine

    # a store file of the run's own: a port found free and released could be taken
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    cfg = parse_config(argv, world_size=world)
    meshes = ParallelDims.from_config(cfg, world).build_mesh("cpu")
    result = {}
    for initialise in (True, False):
        dist.barrier()
        start = time.perf_counter()
        Engine(cfg, meshes, initialise=initialise)
        result[f"build_{'init' if initialise else 'noinit'}_s"] = time.perf_counter() - start
    assert checkpoint_to_load(cfg) is not None
    modes = {"dcp": (dcp.FileSystemReader, {}), "ours": (ShardReader, {}),
             "ours_all_runs": (ShardReader, {"min_gap": 0})}
    loaded = {}
    for mode, (base, kwargs) in modes.items():
        readers = []

        class Counted(base):
            def __init__(self, path):
                super().__init__(path, **kwargs)
                self.fs = CountingFileSystem()
                readers.append(self)

        manager_module.ShardReader = Counted
        engine = Engine(cfg, meshes, initialise=False)
        dist.barrier()
        rchar, start = _rchar(), time.perf_counter()
        CheckpointManager(cfg, engine).load()
        seconds, rchar = time.perf_counter() - start, _rchar() - rchar
        counted = sum(r.fs.bytes_read + getattr(r, "bytes_read", 0) for r in readers)
        result[mode] = dict(counted=counted, rchar=rchar, seconds=seconds)
        loaded[mode] = {k: v.to_local() if hasattr(v, "to_local") else v
                        for k, v in engine.modules[0].state_dict().items()}
    # every reader loaded the same values
    result["identical"] = all(torch.equal(loaded["dcp"][k], loaded[m][k]) for m in ("ours", "ours_all_runs")
                              for k in loaded["dcp"])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tp", type=int, default=2)
    a = p.parse_args()

    import torch.multiprocessing as mp

    from megatron_mellama.tools.hf_to_mellama import main as hf_to_mellama

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "hf").mkdir()
        write_source(tmp / "hf", a)
        save = tmp / "ckpt"
        assert hf_to_mellama(["--hf-dir", str(tmp / "hf"), "--save", str(save), "--no-progress"]) == 0
        ckpt = save / "iter_0000000"
        size = sum(f.stat().st_size for f in ckpt.iterdir())
        import torch.distributed.checkpoint as dcp

        dtypes = {str(v.properties.dtype) for v in dcp.FileSystemReader(str(ckpt)).read_metadata()
                  .state_dict_metadata.values() if hasattr(v, "properties")}
        argv = ["--num-layers", str(a.layers), "--hidden-size", str(a.hidden), "--num-attention-heads", str(a.heads),
                "--ffn-hidden-size", str(a.ffn), "--vocab-size", str(a.vocab), "--max-position-embeddings", "256",
                "--norm-epsilon", "1e-6", "--seq-length", "64", "--micro-batch-size", "1",
                "--global-batch-size", "1", "--train-iters", "1", "--lr-decay-style", "constant",
                "--tensor-model-parallel-size", str(a.tp), "--load", str(save), "--finetune"]
        out = tmp / "out"
        out.mkdir()
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        mp.start_processes(_rank, args=(a.tp, argv, str(out)), nprocs=a.tp, start_method="spawn")
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(a.tp)]

    print(f"imported checkpoint: {size / 2**20:.1f} MiB on disk, stored as {', '.join(sorted(dtypes))} "
          f"(an fp32 import would be ~{2 * size / 2**20:.1f} MiB); TP{a.tp}, {a.layers} layers, hidden {a.hidden}, "
          f"ffn {a.ffn}, vocab {a.vocab}")
    print(f"{'reader':<34}{'rank':>5}{'read (counted)':>16}{'of ckpt':>9}{'rchar':>14}{'load s':>8}")
    labels = {"dcp": "DCP FileSystemReader (before)", "ours": "ShardReader (min_gap 4 KiB)",
              "ours_all_runs": "ShardReader (every run apart)"}
    for mode, label in labels.items():
        for r, res in enumerate(ranks):
            m = res[mode]
            print(f"{label:<34}{r:>5}{m['counted']:>16,}{m['counted'] / size:>9.3f}{m['rchar']:>14,}"
                  f"{m['seconds']:>8.2f}")
    before = sum(res["dcp"]["counted"] for res in ranks) / len(ranks)
    after = sum(res["ours"]["counted"] for res in ranks) / len(ranks)
    print(f"bytes read per rank: {before / 2**20:.2f} MiB before, {after / 2**20:.2f} MiB after "
          f"({after / size:.3f} of the checkpoint, {before / after:.2f}x less); loaded values identical: "
          f"{all(res['identical'] for res in ranks)}")
    build = [(res["build_init_s"], res["build_noinit_s"]) for res in ranks]
    print("engine build per rank: " + "; ".join(f"rank {r}: {i:.2f} s initialised, {n:.2f} s not"
                                               for r, (i, n) in enumerate(build)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
