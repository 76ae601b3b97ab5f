"""Lazy, streaming reads of safetensors checkpoints (one tensor in memory at a time).

A :class:`CheckpointReader` is opened on a model directory.  It finds the weights the way
mergekit 0.1.5 does (``model.safetensors.index.json`` first, else ``model.safetensors``),
validates every shard's header up front (so a corrupt download fails before any output is
written) and then reads tensors one by one on request.

Reads are plain ``pread`` calls into a freshly allocated tensor, at the offsets of our own
validated header: one copy from the page cache, no mapping (so resident memory holds only
the tensors alive, not every page ever touched), and the GIL is released while the kernel
copies, so a prefetch thread overlaps reading with the merge math.

Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) are refused: unpickling runs arbitrary
code, and every model on the hub worth merging ships safetensors or can be converted.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge_core.checkpoint_files import INDEX_FILE, SINGLE_FILE, load_config, read_weight_map
from merge_core.checkpoint_view import Derived, model_view
from merge_core.dtypes import safetensors_codes, safetensors_dtypes
from merge_core.errors import ModelError

__all__ = [
    "INDEX_FILE", "SAFETENSORS_DTYPES", "SINGLE_FILE", "TORCH_TO_SAFETENSORS", "CheckpointReader",
    "TensorEntry", "load_config", "parse_header", "read_header",
]  # load_config lives in checkpoint_files; re-exported for the callers that import it from here

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# madvise advice (Linux 5.14+) that maps every page of a range without copy-on-write;
# Python's mmap module gained the name only in 3.13.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
# safetensors refuses headers above 100 MB; a larger length field means a corrupt file.
_MAX_HEADER_BYTES = 100_000_000

SAFETENSORS_DTYPES: Mapping[str, torch.dtype] = safetensors_dtypes()
"""safetensors header dtype code -> torch dtype (the codes this engine reads and writes)."""
TORCH_TO_SAFETENSORS: Mapping[torch.dtype, str] = safetensors_codes()


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it (offsets relative to the data section)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _corrupt(file: Path | str, detail: str) -> ModelError:
    return ModelError(f"{file}: corrupt safetensors header ({detail})")


def parse_header(file: Path | str) -> dict[str, TensorEntry]:
    """Read and validate a safetensors header without touching the tensor data.

    Raises :class:`ModelError` ``"<file>: corrupt safetensors header (...)"`` for a truncated
    file, a bad length field, invalid JSON, an unknown dtype, a size that does not match the
    shape, overlapping data or offsets beyond the end of the file.
    """
    return _parse_header_and_start(file)[0]


def _parse_header_and_start(file: Path | str) -> tuple[dict[str, TensorEntry], int]:
    """:func:`parse_header` plus the file offset where the data section starts."""
    path = Path(file)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"file is {size} bytes, shorter than the 8-byte length field")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise _corrupt(path, f"header length {header_len} exceeds the file size {size}")
            if header_len > _MAX_HEADER_BYTES:
                raise _corrupt(path, f"header length {header_len} is over the 100 MB limit")
            raw = fh.read(header_len)
    except OSError as err:
        raise ModelError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(path, f"header is not valid JSON: {err}".replace("\n", " ")) from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    data_size = size - 8 - header_len
    entries: dict[str, TensorEntry] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _parse_entry(path, name, spec, data_size)
    spans = sorted((e.begin, e.end, n) for n, e in entries.items() if e.end > e.begin)
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise _corrupt(path, f"data of '{name}' overlaps '{prev}'")
    return entries, 8 + header_len


def _parse_entry(path: Path, name: str, spec: Any, data_size: int) -> TensorEntry:
    if not isinstance(spec, dict):
        raise _corrupt(path, f"entry '{name}' is not an object")
    code, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if code not in SAFETENSORS_DTYPES:
        raise _corrupt(path, f"unknown dtype {code!r} for '{name}'")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _corrupt(path, f"bad shape {shape!r} for '{name}'")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _corrupt(path, f"bad data_offsets {offsets!r} for '{name}'")
    dtype = SAFETENSORS_DTYPES[code]
    begin, end = offsets
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise _corrupt(path, f"'{name}' has {end - begin} data bytes, its shape needs {expected}")
    if end > data_size:
        raise _corrupt(path, f"data of '{name}' ends at byte {end}, beyond the end of the file")
    return TensorEntry(dtype, tuple(shape), begin, end)


def read_header(file: Path | str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of a safetensors file, from its validated header only."""
    return {name: (e.dtype, e.shape) for name, e in parse_header(file).items()}


class CheckpointReader:
    """Read tensors one at a time from a safetensors checkpoint directory.

    Use as a context manager (or call :meth:`close`); shard files are opened on first use
    and kept open.  ``get`` returns a fresh tensor holding only that tensor's data, so peak
    memory is the largest tensor read, never the whole model.  Safe to share across threads.
    """

    def __init__(self, model_dir: Path | str) -> None:
        self.path = Path(model_dir)
        self._files: dict[str, Path] = {}  # shard filename -> path
        self._data_start: dict[str, int] = {}  # shard filename -> offset of its data section
        self._where: dict[str, str] = {}  # tensor name -> shard filename
        self._entries: dict[str, TensorEntry] = {}
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._discover()
        # Tensors as the installed transformers' model holds them (fused MoE experts): see
        # merge_core.checkpoint_view.  Their stored parts are hidden from names().
        self._view = self._model_view()
        self._hidden = {source for derived in self._view.values() for source in derived.sources()}

    def _model_view(self) -> dict[str, Derived]:
        config_file = self.path / "config.json"
        if not config_file.is_file():
            return {}
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}  # the planner reports a bad config.json; the stored layout is read here
        if not isinstance(config, dict):
            return {}
        return model_view(config, {name: entry.shape for name, entry in self._entries.items()})

    def _resolve(self, name: str) -> tuple[str, Derived | None]:
        """(stored name, None) for a stored or renamed tensor; (name, how) for a built one."""
        derived = self._view.get(name)
        if derived is None:
            return name, None
        if derived.op == "rename":
            return derived.parts[0][0], None
        return name, derived

    # -- discovery -------------------------------------------------------------------------
    def _discover(self) -> None:
        path = self.path
        if path.is_file() and path.suffix == ".safetensors":
            self._add_shard(path, None)
            return
        if not path.exists():
            raise ModelError(f"{path}: model directory does not exist")
        if not path.is_dir():
            raise ModelError(f"{path}: not a directory or a .safetensors file")
        index, single = path / INDEX_FILE, path / SINGLE_FILE
        if index.is_file():  # mergekit prefers the index when both exist
            self._load_index(index)
        elif single.is_file():
            self._add_shard(single, None)
        else:
            raise ModelError(_no_weights_message(path))

    def _load_index(self, index: Path) -> None:
        by_shard: dict[str, list[str]] = {}
        for name, shard in read_weight_map(index).items():
            by_shard.setdefault(shard, []).append(name)
        for shard, names in by_shard.items():
            self._add_shard(index.parent / shard, names, key=shard)

    def _add_shard(self, file: Path, names: list[str] | None, key: str | None = None) -> None:
        entries, data_start = _parse_header_and_start(file)
        key = key or file.name
        self._files[key] = file
        self._data_start[key] = data_start
        if names is None:
            names = list(entries)
        for name in names:
            if name not in entries:
                raise ModelError(f"{file}: tensor '{name}' from the index is not in this file")
            self._where[name] = key
            self._entries[name] = entries[name]

    # -- inspection ------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names, in index (or header) order (then the model view's, see ``_view``)."""
        return [name for name in self._entries if name not in self._hidden] + list(self._view)

    def stored_names(self) -> list[str]:
        """The names as stored in the files (MoE experts one by one)."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._view or (name in self._entries and name not in self._hidden)

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise ModelError(f"{self.path}: no tensor named '{name}'") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name`` from the header (no data read)."""
        name, derived = self._resolve(name)
        if derived is not None:
            return derived.shape({n: self._entry(n).shape for n in derived.sources()})
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of ``name``."""
        name, derived = self._resolve(name)
        return self._entry(derived.parts[0][0] if derived is not None else name).dtype

    def nbytes(self, name: str) -> int:
        """Stored size of ``name`` in bytes."""
        name, derived = self._resolve(name)
        if derived is not None:
            return sum(self._entry(n).nbytes for n in derived.sources())
        return self._entry(name).nbytes

    def total_bytes(self) -> int:
        """Size of all tensors in bytes (what an index's ``total_size`` holds)."""
        return sum(e.nbytes for e in self._entries.values())

    def files(self) -> list[Path]:
        """The safetensors files this checkpoint consists of."""
        return list(self._files.values())

    # -- reading ---------------------------------------------------------------------------
    def _fd(self, shard: str) -> int:
        with self._lock:
            fd = self._fds.get(shard)
            if fd is None:
                file = self._files[shard]
                try:
                    fd = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError as err:
                    raise ModelError(f"{file}: cannot open ({err.strerror or err})") from None
                self._fds[shard] = fd
            return fd

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` in its stored dtype, in freshly allocated memory the caller owns."""
        name, derived = self._resolve(name)
        if derived is not None:
            return derived.build(self.read)
        entry = self._entry(name)
        shard = self._where[name]
        buf = torch.empty(entry.nbytes, dtype=torch.uint8)
        if entry.nbytes:
            offset = self._data_start[shard] + entry.begin
            try:
                _pread_into(self._fd(shard), memoryview(buf.numpy()), offset)
            except OSError as err:
                file = self._files[shard]
                raise ModelError(f"{file}: cannot read '{name}' ({err.strerror or err})") from None
        return buf.view(entry.dtype).reshape(entry.shape)

    def mappable(self, name: str) -> bool:
        """Whether :meth:`map` can map tensor ``name`` (not empty, its offset aligned to its dtype)
        rather than fall back to a copy (it still does for a file cut short since it was opened)."""
        name, derived = self._resolve(name)
        if derived is not None:
            return False
        entry = self._entry(name)
        offset = self._data_start[self._where[name]] + entry.begin
        return entry.nbytes > 0 and (offset % mmap.ALLOCATIONGRANULARITY) % entry.dtype.itemsize == 0

    def map(self, name: str) -> torch.Tensor:
        """Tensor ``name`` in its stored dtype as a private copy-on-write map of the file.

        No copy is made: the page tables are filled up front where the kernel can
        (``MADV_POPULATE_READ``, Linux 5.14+), so the calling thread (a prefetcher) rather
        than the one doing the math pays for the page faults, and the mapping goes away with
        the tensor.  Writes to the tensor stay private.  Falls back to :meth:`read` where a
        map cannot be made (empty or misaligned tensors).
        """
        if not self.mappable(name):
            return self.read(name)
        name, _ = self._resolve(name)
        entry = self._entry(name)
        shard = self._where[name]
        offset = self._data_start[shard] + entry.begin
        delta = offset % mmap.ALLOCATIONGRANULARITY
        fd = self._fd(shard)
        # Touching a mapped page past the end of a file kills the process (SIGBUS); a file
        # cut short since its header was validated goes through read(), which reports it.
        if os.fstat(fd).st_size < offset + entry.nbytes:
            return self.read(name)
        try:
            mapped = mmap.mmap(
                fd, delta + entry.nbytes, flags=mmap.MAP_PRIVATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset - delta,
            )  # fmt: skip
        except (OSError, ValueError):
            return self.read(name)
        try:
            mapped.madvise(_MADV_POPULATE_READ)
        except OSError as err:
            if err.errno == errno.EFAULT:  # pages beyond the end of the file
                mapped.close()
                return self.read(name)
            # EINVAL: kernel older than 5.14, pages are faulted in on first touch instead
        count = entry.nbytes // entry.dtype.itemsize
        return torch.frombuffer(mapped, dtype=entry.dtype, count=count, offset=delta).reshape(entry.shape)

    def get(
        self,
        name: str,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        *,
        mapped: bool = False,
    ) -> torch.Tensor:
        """Read tensor ``name``, cast to ``dtype`` (if given) and placed on ``device``.

        The result is private to the caller, who may modify it.  ``mapped=True`` reads
        through :meth:`map` (no copy; best for data used once, such as a streaming merge),
        otherwise the data is copied into process memory (best for data kept around: a map
        would be re-read from disk if the kernel dropped those cache pages).
        """
        tensor = self.map(name) if mapped else self.read(name)
        target = torch.device(device)
        if dtype is None or dtype == tensor.dtype:
            return tensor if target.type == "cpu" else tensor.to(target)
        # Move the narrower representation across devices, cast on the other side.
        if target.type != "cpu" and dtype.itemsize > tensor.dtype.itemsize:
            return tensor.to(target).to(dtype)
        return tensor.to(dtype).to(target)

    def close(self) -> None:
        """Close the open shard files (the reader can still be used; it reopens them)."""
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:  # closing is best effort; the descriptor is dropped either way
                pass

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self._entries)} tensors)"


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` (loops: one read returns at most ~2 GiB)."""
    done, total = 0, len(view)
    while done < total:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:  # the file shrank after its header was validated
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += got


def _no_weights_message(path: Path) -> str:
    files = sorted(p.name for p in path.iterdir() if p.is_file())
    pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES) or f.endswith(".bin.index.json")]
    if pickles:
        shown = ", ".join(pickles[:3]) + (", ..." if len(pickles) > 3 else "")
        return (
            f"{path}: only pickle checkpoints found ({shown}); pickle checkpoints are not "
            "loaded, convert the model to safetensors"
        )
    loose = [f for f in files if f.endswith(".safetensors")]
    if loose:
        shown = ", ".join(loose[:3]) + (", ..." if len(loose) > 3 else "")
        return (
            f"{path}: found {shown} but no {SINGLE_FILE} or {INDEX_FILE} "
            "(mergekit and transformers do not load that layout)"
        )
    return f"{path}: no model weights found (expected {SINGLE_FILE} or {INDEX_FILE})"

