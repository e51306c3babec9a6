"""Streams JSONL inputs (plain or gzip) as blocks of whole lines, never the whole file.

The reader does no per-line work: it cuts each block at its last newline and counts the lines in C,
so one process feeds many tokenizing workers. Workers split, decode and parse the lines.

A line longer than `max_line_bytes` (`--max-line-bytes`, default MAX_LINE_BYTES = 64 MiB) is never
held in memory: the reader skips to its end and hands on a reject for it instead (tokenizing one
200 MB line took over 10 GB), so memory stays bounded by the limit whatever the input.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import os
import zlib
from dataclasses import dataclass
from typing import Iterator

from ..errors import MellamaError

BLOCK_BYTES = 1 << 20
MAX_LINE_BYTES = 64 << 20


@dataclass(frozen=True)
class Block:
    file_index: int
    first_line: int  # 1-based number of the block's first line in its file
    data: bytes  # whole lines, the last one possibly without its newline (end of file)
    rejects: tuple = ()  # (line number, reason) of lines the reader dropped (too long)


def expand_inputs(spec: str) -> list[str]:
    """A file, or a glob matching files (sorted, so the order is reproducible); [] when nothing matches."""
    if os.path.isfile(spec):
        return [spec]
    if glob.has_magic(spec):
        return sorted(p for p in glob.glob(spec) if os.path.isfile(p))
    return []


def open_input(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def too_long(n_bytes: int, limit: int) -> str:
    return f"line longer than --max-line-bytes {limit} ({n_bytes} bytes)"


class InputError(MellamaError):
    """An input file that cannot be read as what its name says (a corrupt or misnamed .gz); names it."""


def read_blocks(paths: list[str], block_bytes: int | None = None,
                max_line_bytes: int | None = None) -> Iterator[Block]:
    for file_index, path in enumerate(paths):
        with _naming_the_input(path):
            yield from _file_blocks(file_index, path, block_bytes, max_line_bytes)


@contextlib.contextmanager
def _naming_the_input(path: str):
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        what = "is not a gzip file" if isinstance(err, gzip.BadGzipFile) else "is a truncated or corrupt gzip file"
        raise InputError(f"--input {path} {what} ({err})") from None


def _file_blocks(file_index: int, path: str, block_bytes: int | None, max_line_bytes: int | None):
    block_bytes = block_bytes or BLOCK_BYTES
    limit = max_line_bytes or MAX_LINE_BYTES
    read_size = min(block_bytes, limit)  # so every line inside one read is within the limit
    line = 1
    carry: list[bytes] = []  # the start of the current line (no newline yet), at most `limit` bytes
    carried = 0
    skipping = None  # bytes so far of an over-long line being skipped
    with open_input(path) as f:
        while True:
            data = f.read(read_size)
            if not data:
                break
            if skipping is not None:
                nl = data.find(b"\n")
                if nl < 0:
                    skipping += len(data)
                    continue
                yield Block(file_index, line, b"", ((line, too_long(skipping + nl, limit)),))
                line, skipping = line + 1, None
                data = data[nl + 1:]
                if not data:
                    continue
            nl = data.find(b"\n")
            if nl < 0:
                if carried + len(data) > limit:
                    skipping, carry, carried = carried + len(data), [], 0
                else:
                    carry.append(data)
                    carried += len(data)
                continue
            if carried + nl > limit:
                yield Block(file_index, line, b"", ((line, too_long(carried + nl, limit)),))
                line += 1
                data = data[nl + 1:]
            elif carry:
                data = b"".join(carry) + data
            carry, carried = [], 0
            cut = data.rfind(b"\n")
            if cut < 0:  # only after an over-long line: the rest starts the next line
                if data:
                    carry, carried = [data], len(data)
                continue
            block = data[:cut + 1]
            rest = data[cut + 1:]
            carry, carried = ([rest], len(rest)) if rest else ([], 0)
            yield Block(file_index, line, block)
            line += block.count(b"\n")
    if skipping is not None:
        yield Block(file_index, line, b"", ((line, too_long(skipping, limit)),))
    elif carry:
        yield Block(file_index, line, b"".join(carry))


def sample_texts(paths: list[str], keys: list[str] | None, max_chars: int,
                 max_line_bytes: int | None = None) -> Iterator[str]:
    """Texts under `keys` (None: every string of the record, at any depth) from the start of the
    input, up to about `max_chars`; bad lines and blank texts are skipped."""
    import json

    total = 0
    for path in paths:
        with _naming_the_input(path), open_input(path) as f:
            for raw in _bounded_lines(f, max_line_bytes or MAX_LINE_BYTES):
                try:
                    record = json.loads(raw)
                except (ValueError, RecursionError):
                    continue
                if keys is None:
                    texts = json_strings(record)
                elif isinstance(record, dict):
                    texts = (record.get(key) for key in keys)
                else:
                    continue
                for text in texts:
                    if isinstance(text, str) and text.strip():
                        yield text
                        total += len(text)
                if total >= max_chars:
                    return


def json_strings(value) -> Iterator[str]:
    """Every string in a parsed JSON value, object keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from json_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from json_strings(item)


def _bounded_lines(f, limit: int):
    """The lines of `f`, each read at most `limit` + 1 bytes at a time; longer lines are skipped."""
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        if len(raw) > limit and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # the rest of the long line, in bounded reads
                raw = f.readline(limit + 1)
            continue
        yield raw

