"""A DCP FileSystemReader that reads of each stored tensor only the bytes this rank asked for.

DCP's FileSystemReader `torch.load`s every stored item a rank's plan touches whole, then narrows
it: a tensor-parallel rank loading an imported checkpoint (whole tensors) reads the whole of every
tensor of its stages. Every DCP item in a FileSystemWriter checkpoint is a `torch.save` archive
(an uncompressed zip) whose tensor data is one record, row-major for a contiguous tensor. This
reader parses only the archive's header (`torch.load(map_location="meta")`: the tensor's shape,
strides and the record's offset, a few KiB), then reads only the byte runs the request covers:

- rows (a slice along dim 0, as TP shards q/k/v/gate/up, the embedding and the output layer, and
  as FSDP shards everything) are one contiguous run: exactly this rank's share is read;
- columns (a slice along a later dim, as TP shards o_proj and down_proj) are one run per row. Runs
  separated by at least `min_gap` bytes (default 4 KiB, a page: a smaller gap shares pages with
  the runs around it, so the storage would read it anyway) are read one by one, exactly the share;
  closer runs are read as one span through the gaps, which for a TP column shard is the whole
  tensor. Under TP >= 2 the gap is at least half a stored row: 4 KiB at LLaMA2-7B's hidden size in
  bf16, more at 13B/70B, in fp32 and for down_proj, so real models read their share of every
  tensor (one read per row for the column shards); only toy widths read column shards whole.

Anything else (a stored view that is not contiguous, a stream transform such as compression, an
archive torch cannot parse as meta, an empty tensor, a byte item) goes to DCP's own reading.
The reader also refuses a checkpoint whose stored chunks do not cover some tensor whole: DCP would
leave the uncovered part as it was, undefined in an engine built without initialisation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import math
import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

from ..torch_private import storage_checkpoint_offset

MIN_GAP = 4096


class _FileView(io.RawIOBase):
    """Bytes [offset, offset + length) of an open binary file, as a seekable file of their own."""

    def __init__(self, base, offset: int, length: int):
        super().__init__()
        self._base, self._offset, self._length, self._pos = base, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._length - self._pos))
        if n == 0:
            return 0
        self._base.seek(self._offset + self._pos)
        got = self._base.readinto(view[:n])
        self._pos += got
        return got


@dataclasses.dataclass(frozen=True)
class _Stored:
    """A stored tensor: its dtype, shape and storage offset (elements) and where its data starts."""

    dtype: torch.dtype
    shape: tuple
    storage_offset: int
    data_start: int  # byte offset of the storage's first byte in the file


def _contiguous_strides(shape) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _stored_tensor(stream, info) -> _Stored | None:
    """Shape, dtype and data offset of a `torch.save`d contiguous tensor item, from its header only;
    None when the item is anything else."""
    if getattr(info, "transform_descriptors", None):
        return None
    try:
        meta = torch.load(_FileView(stream, info.offset, info.length), map_location="meta", weights_only=True)
        start = storage_checkpoint_offset(meta.untyped_storage())
    except Exception:
        return None
    if (not isinstance(meta, torch.Tensor) or not isinstance(start, int) or meta.numel() == 0
            or tuple(meta.stride()) != _contiguous_strides(meta.shape)):
        return None
    return _Stored(meta.dtype, tuple(meta.shape), meta.storage_offset(), info.offset + start)


def _runs(shape: tuple, offsets: tuple, lengths: tuple):
    """The request (offsets, lengths) of a row-major tensor of `shape` as equal runs of elements:
    (first element of each run, elements per run), runs in row-major order."""
    strides = _contiguous_strides(shape)
    d = len(shape) - 1
    # the innermost dims the request covers whole join the run
    while d > 0 and offsets[d] == 0 and lengths[d] == shape[d]:
        d -= 1
    run = lengths[d] * strides[d] if shape else 1
    base = sum(o * s for o, s in zip(offsets[d:d + 1], strides[d:d + 1]))
    outer = [range(o, o + n) for o, n in zip(offsets[:d], lengths[:d])]
    starts = [base + sum(i * s for i, s in zip(index, strides)) for index in itertools.product(*outer)]
    return starts, run


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise OSError(f"unexpected end of file at byte {offset}")
        view, offset = view[n:], offset + n


class ShardReader(dcp.FileSystemReader):
    """`dcp.FileSystemReader` reading only the requested part of each stored tensor (module doc).

    `bytes_read` counts the tensor bytes this reader read itself (headers and the items it handed to
    DCP's own reading are not in it)."""

    def __init__(self, path, min_gap: int = MIN_GAP):
        super().__init__(path)
        self.min_gap = min_gap
        self.bytes_read = 0

    def set_up_storage_reader(self, metadata, is_coordinator: bool, *args, **kwargs) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        # DCP reads the chunks a tensor's metadata lists and leaves any part no chunk covers as it
        # was: in an engine built without initialisation, undefined values. Refuse such a checkpoint.
        for fqn, md in metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                stored = sum(math.prod(c.sizes) for c in md.chunks)
                if stored < math.prod(md.size):
                    raise ValueError(f"tensor {fqn}: its stored chunks hold {stored} of its {math.prod(md.size)} "
                                     "elements")

    def read_data(self, plan, planner) -> Future:
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        rest = []
        for relative_path, items in per_file.items():
            with self.fs.create_stream(self.fs.concat_path(self.path, relative_path), "rb") as stream:
                stored = {}
                for item in sorted(items, key=lambda i: self.storage_data[i.storage_index].offset):
                    if item.type == LoadItemType.BYTE_IO:
                        rest.append(item)
                        continue
                    if item.storage_index not in stored:
                        stored[item.storage_index] = _stored_tensor(stream, self.storage_data[item.storage_index])
                    s = stored[item.storage_index]
                    if s is None:
                        rest.append(item)
                        continue
                    tensor = self._read(stream, s, tuple(item.storage_offsets), tuple(item.lengths))
                    target = planner.resolve_tensor(item).detach()
                    if target.size() != tensor.size():
                        raise AssertionError(f"req {item.storage_index} mismatch sizes {target.size()} vs "
                                             f"{tensor.size()}")
                    target.copy_(tensor)
                    planner.commit_tensor(item, target)
        if rest:
            return super().read_data(dataclasses.replace(plan, items=rest), planner)
        future: Future = Future()
        future.set_result(None)
        return future

    def _read(self, stream, s: _Stored, offsets: tuple, lengths: tuple) -> torch.Tensor:
        size = torch.empty((), dtype=s.dtype).element_size()
        starts, run = _runs(s.shape, offsets, lengths)
        first = s.data_start + (s.storage_offset + starts[0]) * size
        numel = len(starts) * run
        gap = (starts[1] - starts[0] - run) * size if len(starts) > 1 else 0
        fd = stream.fileno()
        if len(starts) > 1 and gap < self.min_gap:
            # one span through the gaps, then the request's elements out of it
            span = starts[-1] + run - starts[0]
            buffer = torch.empty(span * size, dtype=torch.uint8)
            _pread_into(fd, memoryview(buffer.numpy()), first)
            self.bytes_read += buffer.numel()
            return buffer.view(s.dtype).as_strided(lengths, _contiguous_strides(s.shape))
        buffer = torch.empty(numel * size, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        step = run * size
        for i, start in enumerate(starts):
            _pread_into(fd, view[i * step:(i + 1) * step], s.data_start + (s.storage_offset + start) * size)
        self.bytes_read += buffer.numel()
        return buffer.view(s.dtype).view(lengths)


class CountingFileSystem(FileSystem):
    """DCP's local file system, counting the bytes read through the streams it opens (`bytes_read`),
    to measure any reader: `reader.fs = CountingFileSystem()`. Reads by file descriptor
    (`ShardReader`'s data reads) bypass it: that reader counts those itself."""

    def __init__(self):
        super().__init__()
        self.bytes_read = 0

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as stream:
            yield _CountingStream(stream, self) if "r" in mode else stream


class _CountingStream(io.RawIOBase):
    def __init__(self, stream, owner: CountingFileSystem):
        super().__init__()
        self._stream, self._owner = stream, owner

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._stream.fileno()

    def tell(self) -> int:
        return self._stream.tell()

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        return self._stream.seek(pos, whence)

    def readinto(self, buffer) -> int:
        n = self._stream.readinto(buffer)
        self._owner.bytes_read += n or 0
        return n

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._owner.bytes_read += len(data)
        return data
