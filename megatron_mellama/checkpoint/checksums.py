"""Checksums of a checkpoint's files: written at save, verified at load and by `tools/verify_checkpoint.py`.

    SAVE/iter_0000100/checksums.json   {"format": 1, "algorithm": "crc32",
                                        "files": {"__0_0.distcp": {"size": 123, "crc32": "1a2b3c4d"}, ...}}

Every file of the checkpoint directory but `checksums.json` itself is listed, by its path relative
to the directory. Each rank checksums the files it wrote once they are complete (in the background
for an async save), rank 0 adds the rest (`.metadata`, `train_state.json`) and writes the list
before the directory gets its final name and `latest` moves to it. A load verifies every file
(rank r takes its share of the files, by size), so a flipped byte stops the run with one line
naming the file instead of training on it. CRC-32 (zlib) catches every burst error up to 32 bits
and any random corruption with probability 1 - 2^-32; it runs at about 1.5 GB/s on one core here,
sha256 at 0.6 (the file system, not the checksum, is the limit at scale). It is not a defence
against a deliberate change: whoever can write the data can write the list.
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor

from ..errors import MellamaError

CHECKSUMS = "checksums.json"
ALGORITHM = "crc32"
FORMAT = 1
_BLOCK = 8 << 20


class ChecksumError(MellamaError, ValueError):
    """The checksum list of a checkpoint cannot be read; the message names the file."""


def file_checksum(path: str) -> dict:
    """{"size": bytes, "crc32": 8 hex digits} of the file at `path`."""
    crc, size = 0, 0
    buffer = bytearray(_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buffer)
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)  # releases the GIL: files checksum in parallel threads
            size += n
    return {"size": size, ALGORITHM: f"{crc:08x}"}


def checksum_files(directory: str, names, workers: int = 4) -> dict:
    """{name: file_checksum} of the files `names` (relative to `directory`), `workers` at a time."""
    names = sorted(names)
    if not names:
        return {}
    with ThreadPoolExecutor(max(1, min(workers, len(names)))) as pool:
        sums = pool.map(lambda n: file_checksum(os.path.join(directory, n)), names)
        return dict(zip(names, sums))


def files_under(directory: str) -> list[str]:
    """Every file under `directory` (relative paths, '/'-separated) but the checksum list."""
    out = []
    for dirpath, _, files in os.walk(directory):
        rel = os.path.relpath(dirpath, directory)
        for f in files:
            name = f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}"
            if name != CHECKSUMS:
                out.append(name)
    return sorted(out)


def write_checksums(directory: str, files: dict) -> None:
    """`directory/checksums.json`, atomically and durably."""
    path = os.path.join(directory, CHECKSUMS)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as fh:
            json.dump(dict(format=FORMAT, algorithm=ALGORITHM, files=files), fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # a full disk must not also keep the half-written temporary file
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def read_checksums(directory: str) -> dict | None:
    """{name: {"size", "crc32"}} from `directory/checksums.json`; None for a checkpoint without one
    (saved before checksums, or imported); ChecksumError when it is unreadable."""
    path = os.path.join(directory, CHECKSUMS)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read().decode("utf-8"))
        files = data["files"]
        if data.get("algorithm") != ALGORITHM or not isinstance(files, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get(ALGORITHM), str)
                for v in files.values()):
            raise ValueError(f"not a {ALGORITHM} list")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ChecksumError(f"{path}: unreadable checksum list ({type(exc).__name__}: {exc})") from None
    return files


def share(files: dict, rank: int, world: int) -> list[str]:
    """The names rank `rank` of `world` verifies: the largest file to the least loaded rank, so each
    rank reads about 1/world of the bytes; the same answer on every rank."""
    load = [0] * world
    mine = []
    for name in sorted(files, key=lambda n: (-files[n]["size"], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += files[name]["size"]
        if r == rank:
            mine.append(name)
    return mine


def verify(directory: str, files: dict, names=None, workers: int = 4) -> list[str]:
    """The problems of the files `names` (default: all listed) against `files`, one phrase each:
    `NAME: missing`, `NAME: N bytes, expected M`, `NAME: crc32 X, expected Y`. Empty when all are fine."""
    names = sorted(files if names is None else names)

    def check(name: str) -> str | None:
        want = files[name]
        path = os.path.join(directory, name)
        try:
            size = os.path.getsize(path)
            if size != want["size"]:
                return f"{name}: {size} bytes, expected {want['size']}"
            got = file_checksum(path)
        except FileNotFoundError:
            return f"{name}: missing"
        except OSError as exc:
            return f"{name}: unreadable ({exc.strerror or exc})"
        if got[ALGORITHM] != want[ALGORITHM]:
            return f"{name}: {ALGORITHM} {got[ALGORITHM]}, expected {want[ALGORITHM]}"
        if got["size"] != want["size"]:
            return f"{name}: {got['size']} bytes, expected {want['size']}"
        return None

    if not names:
        return []
    with ThreadPoolExecutor(max(1, min(workers, len(names)))) as pool:
        return [p for p in pool.map(check, names) if p]
