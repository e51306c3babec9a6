"""A writer for megatron-core's IndexedDataset (.bin/.idx) whose memory does not grow with the corpus.

megatron-core's `IndexedDatasetBuilder` keeps every sequence length and document boundary in Python
lists until `finalize`, about 40 bytes per sequence: billions of sentences do not fit. This writer
spills them as int32/int64 to temporary files beside the output and composes the .idx from them in
fixed-size chunks. The bytes written are the builder's, byte for byte (a test holds it to that).

Failure and concurrency. Every output goes to a hidden temporary file beside its final name; a
failure anywhere (a full disk included, even when closing a file fails too) removes all of them
(`abort`), and the final names are touched only by `commit`, which renames the .bin and then the
.idx. Two runs writing one prefix at once could interleave those renames and leave a .bin of one
run beside the .idx of the other, so a run holds `output_lock(PREFIX)` - an exclusive, non-blocking
`fcntl.flock` on `PREFIX.lock` - from its start until its commit is done: a second run for the same
prefix fails at once with `OutputLocked`, naming the pid holding it. The lock goes with the process
(a killed run leaves no stale lock); the file is removed on release.

Beside the pair, `commit` writes `PREFIX.tokens.json` (renamed between the .bin and the .idx):
the smallest and largest token id and the sizes of both files, so that training can check every
id against the model's vocabulary without reading the tokens (`data/prefix_checks.py`, which trusts it
only while both sizes still match). megatron-core's readers ignore it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import struct
import tempfile

import numpy as np

from ..errors import MellamaError

# megatron.core.datasets.indexed_dataset: header, version and DType codes of the .idx format.
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_INDEX_VERSION = 1
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7,
                np.uint16: 8}
_CHUNK = 1 << 20  # elements per read when composing the index


def optimal_dtype(vocab_size: int | None) -> type:
    """`DType.optimal_dtype`: uint16 when every id fits below 65500, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def temp_path(directory: str, final_name: str, suffix: str) -> str:
    """A new empty file beside the final one, with the permissions a plain open() would give it."""
    fd, path = tempfile.mkstemp(dir=directory, prefix=f".{final_name}.", suffix=suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # mkstemp makes 0600; outputs are shared data
    return path


class IndexedWriter:
    """Writes `bin_path` and `idx_path` as `IndexedDatasetBuilder` would, without multimodal modes.

    Data goes to temporary files in the target directory; `finalize` composes the index and renames
    both into place only when `commit` is called, so a failed run leaves existing outputs alone.
    """

    def __init__(self, bin_path: str, idx_path: str, dtype=np.int32):
        self.dtype = np.dtype(dtype).type
        if self.dtype not in _DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {np.dtype(dtype).name}")
        self.bin_path, self.idx_path = os.fspath(bin_path), os.fspath(idx_path)
        directory = os.path.dirname(os.path.abspath(self.bin_path))
        name = os.path.basename(self.bin_path)
        self.stats_path = stats_path(self.bin_path[:-4] if self.bin_path.endswith(".bin") else self.bin_path)
        self._tmp_bin = self._tmp_idx = self._tmp_lengths = self._tmp_docs = self._tmp_stats = None
        self._bin = self._lengths = self._docs = None
        try:  # on a failure half way (a full disk), remove what was made
            self._tmp_bin = temp_path(directory, name, ".tmp")
            self._tmp_idx = temp_path(directory, os.path.basename(self.idx_path), ".tmp")
            self._tmp_lengths = temp_path(directory, name, ".lengths.tmp")
            self._tmp_docs = temp_path(directory, name, ".documents.tmp")
            self._tmp_stats = temp_path(directory, os.path.basename(self.stats_path), ".tmp")
            self._bin = open(self._tmp_bin, "wb")
            self._lengths = open(self._tmp_lengths, "wb")
            self._docs = open(self._tmp_docs, "wb")
        except BaseException:
            self.abort()
            raise
        self.sequence_count = 0
        self.document_count = 0  # boundaries after the leading 0
        self.token_count = 0
        self.min_token_id = self.max_token_id = None
        self._finalized = False

    def add_batch(self, tokens: np.ndarray, sequence_lengths: np.ndarray, document_sequence_counts: np.ndarray):
        """Append many documents: all their tokens, each sequence's length, each document's sequence count."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        lengths = np.ascontiguousarray(sequence_lengths, dtype=np.int32)
        counts = np.asarray(document_sequence_counts, dtype=np.int64)
        self._bin.write(memoryview(tokens).cast("B"))
        self._lengths.write(memoryview(lengths).cast("B"))
        ends = np.cumsum(counts, dtype=np.int64)
        ends += self.sequence_count
        self._docs.write(memoryview(ends).cast("B"))
        self.sequence_count += len(lengths)
        self.document_count += len(counts)
        self.token_count += len(tokens)
        if len(tokens):
            lo, hi = tokens.min().item(), tokens.max().item()
            self.min_token_id = lo if self.min_token_id is None else min(lo, self.min_token_id)
            self.max_token_id = hi if self.max_token_id is None else max(hi, self.max_token_id)

    def add_document(self, tokens, lengths):
        """`IndexedDatasetBuilder.add_document`: one document made of sequences of the given lengths."""
        self.add_batch(np.asarray(tokens), np.asarray(lengths), np.array([len(lengths)]))

    def finalize(self) -> None:
        """Close the data file and write the index to its temporary name."""
        for f in (self._bin, self._lengths, self._docs):
            f.close()
        itemsize = np.dtype(self.dtype).itemsize
        with open(self._tmp_idx, "wb") as idx:
            idx.write(_INDEX_HEADER)
            idx.write(struct.pack("<Q", _INDEX_VERSION))
            idx.write(struct.pack("<B", _DTYPE_CODES[self.dtype]))
            idx.write(struct.pack("<Q", self.sequence_count))
            idx.write(struct.pack("<Q", self.document_count + 1))
            for chunk in _chunks(self._tmp_lengths, np.int32):
                idx.write(memoryview(chunk).cast("B"))
            offset = 0
            for chunk in _chunks(self._tmp_lengths, np.int32):
                # byte offset of each sequence: exclusive running sum of length * itemsize
                ends = np.cumsum(chunk, dtype=np.int64) * itemsize + offset
                starts = np.empty_like(ends)
                starts[0] = offset
                starts[1:] = ends[:-1]
                offset = int(ends[-1])
                idx.write(memoryview(starts).cast("B"))
            idx.write(struct.pack("<q", 0))
            for chunk in _chunks(self._tmp_docs, np.int64):
                idx.write(memoryview(chunk).cast("B"))
        for path in (self._tmp_lengths, self._tmp_docs):
            os.remove(path)
        self._finalized = True

    def commit(self) -> None:
        """Move the finished files to their final names (data first, index last)."""
        if not self._finalized:
            self.finalize()
        stats = {"format": 1, "bin_bytes": os.path.getsize(self._tmp_bin), "idx_bytes": os.path.getsize(self._tmp_idx),
                 "min_token_id": self.min_token_id, "max_token_id": self.max_token_id}
        with open(self._tmp_stats, "w") as f:
            f.write(json.dumps(stats) + "\n")
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_stats, self.stats_path)
        os.replace(self._tmp_idx, self.idx_path)

    def abort(self) -> None:
        """Close and delete every temporary file; the final names are never touched. Never raises
        for I/O: closing may fail to flush on a full disk, and the files must go regardless."""
        for f in (self._bin, self._lengths, self._docs):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        for path in (self._tmp_bin, self._tmp_idx, self._tmp_lengths, self._tmp_docs, self._tmp_stats):
            if path is not None:
                with contextlib.suppress(OSError):
                    os.remove(path)


def stats_path(prefix: str) -> str:
    """The token-id sidecar of a dataset prefix (see the module docstring)."""
    return f"{prefix}.tokens.json"


def read_stats(prefix: str):
    """(min id, max id) from the sidecar when it describes the .bin/.idx there now, else None."""
    try:
        with open(stats_path(prefix)) as f:
            stats = json.loads(f.read(4096))
        if (stats.get("format") == 1 and stats["bin_bytes"] == os.path.getsize(prefix + ".bin")
                and stats["idx_bytes"] == os.path.getsize(prefix + ".idx")):
            lo, hi = stats["min_token_id"], stats["max_token_id"]
            if (lo is None and hi is None) or (isinstance(lo, int) and isinstance(hi, int)):
                return lo, hi
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


class OutputLocked(MellamaError):
    """Another process holds the output lock of a prefix; the message says which."""


@contextlib.contextmanager
def output_lock(prefix: str):
    """Hold `PREFIX.lock` exclusively (`fcntl.flock`, non-blocking) for the block; see the module
    docstring. Raises OutputLocked when another process holds it."""
    path = f"{prefix}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            try:
                with open(path) as f:
                    holder = f.read().strip()
            except OSError:
                holder = ""
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise OutputLocked(f"{path} is locked: {who} is writing outputs with this prefix; "
                               "wait for it to finish, or choose another --output-prefix") from None
        try:  # the holder before us may have removed the file after we opened it: lock the one there
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)  # while still locked, so no one locks a file that is about to vanish
        os.close(fd)


def _chunks(path: str, dtype):
    itemsize = np.dtype(dtype).itemsize
    with open(path, "rb") as f:
        while True:
            data = f.read(_CHUNK * itemsize)
            if not data:
                return
            yield np.frombuffer(data, dtype=dtype)
