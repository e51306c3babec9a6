"""Streams JSONL inputs (plain or gzip) as blocks of whole lines, never the whole file.

The reader does no per-line work: it cuts each block at its last newline and counts the lines in C,
so one process feeds many tokenizing workers. Workers split, decode and parse the lines.
"""

from __future__ import annotations

import glob
import gzip
import os
from dataclasses import dataclass
from typing import Iterator

BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class Block:
    file_index: int
    first_line: int  # 1-based number of the block's first line in its file
    data: bytes  # whole lines, the last one possibly without its newline (end of file)


def expand_inputs(spec: str) -> list[str]:
    """A file, or a glob matching files (sorted, so the order is reproducible); [] when nothing matches."""
    if os.path.isfile(spec):
        return [spec]
    if glob.has_magic(spec):
        return sorted(p for p in glob.glob(spec) if os.path.isfile(p))
    return []


def open_input(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_blocks(paths: list[str], block_bytes: int | None = None) -> Iterator[Block]:
    block_bytes = block_bytes or BLOCK_BYTES
    for file_index, path in enumerate(paths):
        line = 1
        carry = b""
        with open_input(path) as f:
            while True:
                data = f.read(block_bytes)
                if not data:
                    break
                data = carry + data
                cut = data.rfind(b"\n")
                if cut < 0:  # a line longer than a block: keep reading
                    carry = data
                    continue
                carry = data[cut + 1:]
                block = data[:cut + 1]
                yield Block(file_index, line, block)
                line += block.count(b"\n")
        if carry:
            yield Block(file_index, line, carry)


def sample_texts(paths: list[str], keys: list[str], max_chars: int) -> Iterator[str]:
    """Texts under `keys` from the start of the input, up to about `max_chars`; bad lines are skipped."""
    import json

    total = 0
    for path in paths:
        with open_input(path) as f:
            for raw in f:
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(record, dict):
                    continue
                for key in keys:
                    text = record.get(key)
                    if isinstance(text, str) and text.strip():
                        yield text
                        total += len(text)
                if total >= max_chars:
                    return
