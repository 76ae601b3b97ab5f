"""Safetensors files written straight from tensor memory, in one go or streamed by a thread.

The safetensors format puts a JSON header (every tensor's dtype, shape and byte offsets)
before the data.  :func:`safetensors_layout` computes that header from names, dtypes and
shapes alone, which lets :class:`ShardStream` write each tensor to its final offset as soon
as it exists (the declared mode of :class:`merge_core.writer.ShardedModelWriter`), while
:func:`write_safetensors` writes a whole buffered shard.  Both give byte-identical files.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge_core.tensor_io import TORCH_TO_SAFETENSORS

_WRITE_CHUNK = 1 << 28  # bytes per write() call: stays below Linux's ~2 GiB single-write cap
# Streamed mode: bytes of added tensors the background thread may have queued before put()
# waits (bounds memory), and bytes written between two "start writing back now" hints.
_QUEUE_BYTES = 64 << 20
_WRITEBACK_EVERY = 64 << 20


def safetensors_layout(
    specs: dict[str, tuple[torch.dtype, Sequence[int]]], metadata: dict[str, str]
) -> tuple[bytes, dict[str, int], int]:
    """``(header prefix, {name: data offset}, data bytes)`` of a safetensors file of ``specs``.

    The prefix is the 8-byte length plus the JSON header padded to 8 bytes; a tensor's bytes
    go at ``len(prefix) + offset``.  Like safetensors, data is ordered by decreasing element
    size (then name) so every tensor stays aligned.
    """
    order = sorted(specs, key=lambda n: (-specs[n][0].itemsize, n))
    header: dict[str, Any] = {"__metadata__": metadata}
    offsets: dict[str, int] = {}
    offset = 0
    for name in order:
        dtype, shape = specs[name]
        nbytes = numel_of(shape) * dtype.itemsize
        header[name] = {
            "dtype": TORCH_TO_SAFETENSORS[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offsets[name] = offset
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, offsets, offset


def numel_of(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of contiguous CPU tensor ``t`` (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> int:
    """Write ``tensors`` (contiguous, CPU) as one safetensors file; returns the data bytes.

    Streams each tensor's memory straight to the file: no serialized copy of the shard is
    built, and tensors sharing storage (views, tied weights) are fine.
    """
    specs = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    prefix, offsets, total = safetensors_layout(specs, metadata)
    with open(path, "wb") as fh:
        fh.write(prefix)
        for name in sorted(offsets, key=offsets.__getitem__):
            t = tensors[name]
            if t.numel() == 0:
                continue
            view = _byte_view(t)
            for start in range(0, len(view), _WRITE_CHUNK):
                fh.write(view[start : start + _WRITE_CHUNK])
    return total


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + _WRITE_CHUNK], offset + done)


def _load_sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux), or None: starts writeback without waiting for it."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE_WRITE = 2


@dataclass
class ShardFile:
    """One shard of a declared layout: its file, header and how many tensors are still due."""

    part: str
    names: list[str]
    prefix: bytes
    size: int
    pending: int
    fd: int | None = None
    unflushed: int = 0


@dataclass
class TensorSlot:
    shard: ShardFile
    offset: int  # absolute file offset of the tensor's data
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class ShardStream:
    """Background writing of a declared layout (see :meth:`ShardedModelWriter.declare`)."""

    tmp_dir: Path
    shards: list[ShardFile]
    slots: dict[str, TensorSlot]
    writeback: bool = True  # hint the kernel to write shards back early (for the final fsync)
    queue: deque = field(default_factory=deque)
    queued_bytes: int = 0
    closing: bool = False
    error: BaseException | None = None
    cond: threading.Condition = field(default_factory=threading.Condition)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self._sync_range = _load_sync_file_range() if self.writeback else None
        self.thread = threading.Thread(target=self._run, name="safetensors-writer", daemon=True)
        self.thread.start()

    def put(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        with self.cond:
            while self.queue and self.queued_bytes + nbytes > _QUEUE_BYTES and self.error is None:
                self.cond.wait()
            self.raise_error()
            self.queue.append((name, t))
            self.queued_bytes += nbytes
            self.cond.notify_all()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Write everything queued, stop the thread and close the files; re-raises its error."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()
        for shard in self.shards:
            if shard.fd is not None:
                os.close(shard.fd)
                shard.fd = None
        self.raise_error()

    def discard(self) -> None:
        """Stop as soon as possible, dropping what is queued (the files are deleted after)."""
        with self.cond:
            self.queued_bytes -= sum(t.numel() * t.element_size() for _, t in self.queue)
            self.queue.clear()
        try:
            self.close()
        except BaseException:  # noqa: BLE001 - the output is being thrown away anyway
            pass

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if not self.queue:
                    return
                name, t = self.queue.popleft()
            try:
                if self.error is None:
                    self._write(name, t)
            except BaseException as err:  # noqa: BLE001 - handed to the producer thread
                self.error = err
            with self.cond:
                self.queued_bytes -= t.numel() * t.element_size()
                self.cond.notify_all()
            del t

    def _write(self, name: str, t: torch.Tensor) -> None:
        slot = self.slots[name]
        shard = slot.shard
        if shard.fd is None:
            shard.fd = os.open(self.tmp_dir / shard.part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            _pwrite_all(shard.fd, memoryview(shard.prefix), 0)
            os.ftruncate(shard.fd, shard.size)
        if t.numel():
            _pwrite_all(shard.fd, _byte_view(t), slot.offset)
            shard.unflushed += t.numel() * t.element_size()
        shard.pending -= 1
        if shard.unflushed >= _WRITEBACK_EVERY or (shard.pending == 0 and shard.unflushed):
            # Start writing back now, so the fsync before the final rename finds little left
            # (the kernel alone would wait until dirty pages are 30 s old or many GB).
            if self._sync_range is not None:
                self._sync_range(shard.fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
            shard.unflushed = 0
        if shard.pending == 0:
            os.close(shard.fd)
            shard.fd = None
