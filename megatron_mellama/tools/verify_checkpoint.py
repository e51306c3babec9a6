"""Verify a checkpoint's files against the checksums its save recorded, without loading it.

    mellama-verify-checkpoint SAVE                 the checkpoint SAVE/latest names
    mellama-verify-checkpoint SAVE/iter_0000100    one iteration
    mellama-verify-checkpoint SAVE --all           every iteration under SAVE

Exit 0 when every file matches, 1 when a file is missing, has another size or another CRC-32 (each
named on its own line), 2 when the path is not a checkpoint or has no checksum list (a checkpoint
saved before checksums, or imported from Hugging Face / Meta).
"""

import argparse
import os
import time

from megatron_mellama.checkpoint.checksums import CHECKSUMS, ChecksumError, read_checksums, verify
from megatron_mellama.tools.cli import OneLineParser, run_tool

from ..errors import MellamaError

PROG = "mellama-verify-checkpoint"


class VerifyError(MellamaError, ValueError):
    """A path that is not a verifiable checkpoint; the message names it."""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a checkpoint root (its 'latest' is verified) or one iter_NNNNNNN directory")
    p.add_argument("--all", action="store_true", help="verify every iter_* directory under the root")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="files checked at once")
    return p


def checkpoints_of(path: str, every: bool) -> list[str]:
    from megatron_mellama.checkpoint.layout import ITER_DIR, CheckpointError, checkpoint_dir, latest_iteration

    if not os.path.isdir(path):
        raise VerifyError(f"{path}: no such directory")
    if os.path.isfile(os.path.join(path, ".metadata")):
        return [path]
    if every:
        found = sorted(os.path.join(path, n) for n in os.listdir(path) if ITER_DIR.match(n))
        if not found:
            raise VerifyError(f"{path}: no iter_* checkpoint directories")
        return found
    try:
        iteration = latest_iteration(path)
    except CheckpointError as e:
        raise VerifyError(str(e)) from None
    if iteration is None:
        raise VerifyError(f"{path}: not a checkpoint (no .metadata) and no 'latest' file")
    return [checkpoint_dir(path, iteration)]


def _run(args) -> int:
    if args.workers < 1:
        raise VerifyError(f"--workers must be positive, got {args.workers}")
    bad = 0
    for ckpt in checkpoints_of(args.path, args.all):
        try:
            files = read_checksums(ckpt)
        except ChecksumError as e:
            raise VerifyError(str(e)) from None
        if files is None:
            raise VerifyError(f"{ckpt}: no {CHECKSUMS} (saved before checksums, or imported): cannot verify")
        started = time.perf_counter()
        problems = verify(ckpt, files, workers=args.workers)
        seconds = time.perf_counter() - started
        size = sum(v["size"] for v in files.values())
        if problems:
            bad += 1
            print(f"{ckpt}: {len(problems)} of {len(files)} files do not match their checksums:")
            for p in problems:
                print(f"  {os.path.join(ckpt, p)}")
        else:
            print(f"{ckpt}: {len(files)} files, {size / 2 ** 30:.2f} GiB: all match their checksums "
                  f"({seconds:.1f} s, {size / 2 ** 30 / max(seconds, 1e-9):.2f} GiB/s)")
    return 1 if bad else 0


def main(argv=None) -> int:
    return run_tool(PROG, lambda: build_parser().parse_args(argv), _run, errors=(VerifyError,))
