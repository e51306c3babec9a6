"""Reading a Megatron `.idx` file and checking it against its `.bin`, without megatron-core.

megatron-core's reader asserts on a bad file; this one says what is wrong in one line naming the
file, and is fast enough to run on every prefix before training. The layout (megatron-core's
`_IndexWriter`) is: magic, version, dtype code, sequence count, document count, then int32
sequence lengths, int64 sequence byte offsets and int64 document boundaries.
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

import numpy as np

from ..errors import MellamaError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")
# megatron.core.datasets.indexed_dataset.DType codes.
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
          7: np.float32, 8: np.uint16}


class DatasetError(MellamaError, ValueError):
    """A dataset that cannot be read; the message is one line naming the file."""


class Index(NamedTuple):
    prefix: str
    dtype: type
    sequence_lengths: np.ndarray   # int32, memory-mapped
    sequence_pointers: np.ndarray  # int64 byte offsets into the .bin
    document_indices: np.ndarray   # int64, first sequence of each document, then the sequence count

    @property
    def document_count(self) -> int:
        return len(self.document_indices) - 1


def read_index(prefix: str) -> Index:
    """Open `prefix.idx` after checking what megatron-core's reader would otherwise assert on."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for path, other in ((idx, bin_), (bin_, idx)):
        if not os.path.isfile(path):
            has = f"{other} exists but " if os.path.isfile(other) else ""
            raise DatasetError(f"dataset prefix {prefix!r}: {has}{path} is missing")
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < len(INDEX_MAGIC) or head[:len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise DatasetError(f"{idx} is not a Megatron .idx file (no MMIDIDX header)")
    if len(head) < _HEADER.size:
        raise DatasetError(f"{idx} is truncated ({size} bytes, header needs {_HEADER.size})")
    _, version, code, n_seq, n_doc = _HEADER.unpack(head)
    if version != 1:
        raise DatasetError(f"{idx} has index version {version}; only version 1 is known")
    if code not in DTYPES:
        raise DatasetError(f"{idx} has unknown dtype code {code} (known: {sorted(DTYPES)})")
    # Multimodal indices append one int8 mode per sequence, so the size may exceed this.
    need = _HEADER.size + n_seq * 12 + n_doc * 8
    if size < need or n_doc < 1:
        raise DatasetError(f"{idx} is truncated or corrupt ({size} bytes; its header describes "
                           f"{n_seq} sequences and {n_doc} document boundaries, {need} bytes)")
    mm = np.memmap(idx, dtype=np.uint8, mode="r")
    off = _HEADER.size
    lengths = mm[off:off + 4 * n_seq].view(np.int32)
    off += 4 * n_seq
    pointers = mm[off:off + 8 * n_seq].view(np.int64)
    off += 8 * n_seq
    docs = mm[off:off + 8 * n_doc].view(np.int64)
    if docs[-1] != n_seq:
        raise DatasetError(f"{idx} is corrupt: its last document ends at sequence {docs[-1]}, "
                           f"but it holds {n_seq} sequences")
    # O(1) check that the .bin reaches the end of the last sequence; summarise() checks the total.
    itemsize = np.dtype(DTYPES[code]).itemsize
    end = int(pointers[-1]) + int(lengths[-1]) * itemsize if n_seq else 0
    if os.path.getsize(bin_) < end:
        raise DatasetError(f"{bin_} is truncated ({os.path.getsize(bin_)} bytes; {idx} needs {end})")
    return Index(prefix, DTYPES[code], lengths, pointers, docs)


_FINGERPRINTS: dict = {}


def index_fingerprint(prefix: str) -> str | None:
    """sha256 of `prefix.idx` (its document and sequence lengths: what every sample index is built
    from), None when it cannot be read. Remembered per (path, size, mtime), so the several datasets
    of one prefix hash it once; the .idx is about 12 bytes a sequence, well under the .bin."""
    import hashlib

    path = os.path.abspath(prefix + ".idx")
    try:
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key not in _FINGERPRINTS:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(8 << 20), b""):
                    digest.update(block)
            _FINGERPRINTS[key] = digest.hexdigest()
        return _FINGERPRINTS[key]
    except OSError:
        return None
