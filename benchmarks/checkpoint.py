"""What checksums cost a checkpoint save and load, measured inside the same save and load.

    python benchmarks/checkpoint.py                         # hidden 1024, 8 layers, vocab 32000: 1.7 GiB
    python benchmarks/checkpoint.py --hidden 512 --layers 2 --repeats 1

One process saves the full training state (fp32 weights and AdamW moments) of a LLaMA-shaped model
with `CheckpointManager.save`, then loads it with `CheckpointManager.load`. The time spent computing
checksums (at save) and verifying them (at load) is timed where the manager calls them, so the
ratio is of the same save and load. The files are in the page cache when they are read back, so the
load figure is the checksum's CPU cost, not the file system's; on a parallel file system the read
dominates both.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import megatron_mellama.checkpoint.manager as manager_module  # noqa: E402
from megatron_mellama.checkpoint import checksums  # noqa: E402
from megatron_mellama.config import parse_config  # noqa: E402
from megatron_mellama.training.engine import Engine  # noqa: E402


class _Timed:
    """Wraps a function and adds its wall time to `seconds`."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started


def measure(argv: list, root: str) -> dict:
    cfg = parse_config(argv + ["--save", root, "--load", root])
    engine = Engine(cfg)
    # one step, so that AdamW's moments exist and are saved
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 17))
    engine.step([{"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, 16)}])
    manager = manager_module.CheckpointManager(cfg, engine)
    summing = _Timed(checksums.checksum_files)
    checksums.checksum_files = summing
    verifying = _Timed(checksums.verify)
    checksums.verify = verifying
    try:
        started = time.perf_counter()
        manager.save(1, cfg.train.global_batch_size)
        save = time.perf_counter() - started
        started = time.perf_counter()
        manager_module.CheckpointManager(cfg, Engine(cfg, initialise=False)).load()
        load = time.perf_counter() - started
    finally:
        checksums.checksum_files, checksums.verify = summing.fn, verifying.fn
    size = sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())
    return dict(gib=size / 2 ** 30, save=save, save_sums=summing.seconds, load=load, load_sums=verifying.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=2, help="save+load rounds; the fastest is reported")
    args = parser.parse_args()
    argv = ["--model", "tiny", "--num-layers", str(args.layers), "--hidden-size", str(args.hidden),
            "--num-attention-heads", str(max(args.hidden // 64, 2)), "--num-query-groups", "2", "--vocab-size", str(args.vocab),
            "--ffn-hidden-size", str(256 * math.ceil(8 * args.hidden / 3 / 256)),  # LLaMA's rule
            "--max-position-embeddings", "256", "--mock-data", "--train-iters", "1", "--global-batch-size", "1"]
    rounds = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as root:
            rounds.append(measure(argv, root))
    best = min(rounds, key=lambda r: r["save"] + r["load"])
    print(f"checkpoint of {best['gib']:.2f} GiB (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
          "fp32 weights and AdamW moments), one process, files in the page cache:")
    for what in ("save", "load"):
        total, sums = best[what], best[f"{what}_sums"]
        print(f"  {what}: {total:6.2f} s, of which checksums {sums:5.2f} s ({100 * sums / total:4.1f}%); "
              f"without them {total - sums:6.2f} s: x{total / max(total - sums, 1e-9):.2f}; "
              f"checksums at {best['gib'] / max(sums, 1e-9):.2f} GiB/s")


if __name__ == "__main__":
    main()
