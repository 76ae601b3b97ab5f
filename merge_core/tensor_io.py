"""Lazy, streaming reads of safetensors checkpoints (one tensor in memory at a time).

A :class:`CheckpointReader` is opened on a model directory.  It finds the weights the way
mergekit 0.1.5 does (``model.safetensors.index.json`` first, else ``model.safetensors``),
validates every shard's header up front (so a corrupt download fails before any output is
written) and then reads tensors one by one on request.

Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) are refused: unpickling runs arbitrary
code, and every model on the hub worth merging ships safetensors or can be converted.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from merge_core.errors import ModelError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# safetensors refuses headers above 100 MB; a larger length field means a corrupt file.
_MAX_HEADER_BYTES = 100_000_000


def _build_dtype_table() -> dict[str, torch.dtype]:
    names = {
        "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
        "I32": "int32", "U32": "uint32", "I64": "int64", "U64": "uint64",
        "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
        "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
        "F8_E8M0": "float8_e8m0fnu",
    }  # fmt: skip
    # Older torch builds lack some of these (uint16, float8 variants): keep what exists.
    return {code: getattr(torch, name) for code, name in names.items() if hasattr(torch, name)}


SAFETENSORS_DTYPES: dict[str, torch.dtype] = _build_dtype_table()
"""safetensors header dtype code -> torch dtype (the codes this engine reads and writes)."""
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}


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
    return entries


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


def _open_kwargs() -> dict[str, str]:
    """Prefer safetensors' pread backend: it copies one tensor into process memory per read.

    The mmap backend (the only one before safetensors 0.8) maps the file, so resident memory
    grows by every byte touched; those pages are reclaimable page cache, but they make RSS
    look like the whole model is loaded.
    """
    try:
        import inspect

        sig = inspect.signature(safe_open)  # the Rust class may not expose a signature
        if "backend" in sig.parameters:
            return {"backend": "pread"}
    except (TypeError, ValueError):
        pass
    return {}


class CheckpointReader:
    """Read tensors one at a time from a safetensors checkpoint directory.

    Use as a context manager (or call :meth:`close`); shard handles are opened on first use
    and kept open.  ``get`` returns a fresh tensor holding only that tensor's data, so peak
    memory is the largest tensor read, never the whole model.  Safe to share across threads.
    """

    def __init__(self, model_dir: Path | str, *, backend: str | None = None) -> None:
        self.path = Path(model_dir)
        self._files: dict[str, Path] = {}  # shard filename -> path
        self._where: dict[str, str] = {}  # tensor name -> shard filename
        self._entries: dict[str, TensorEntry] = {}
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._open_kwargs = {"backend": backend} if backend else _open_kwargs()
        self._discover()

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
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ModelError(f"{index}: unreadable index ({type(err).__name__}: {err})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{index}: 'weight_map' is missing or empty")
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not _is_plain_relpath(shard):
                raise ModelError(f"{index}: bad shard file name {shard!r} for '{name}'")
            by_shard.setdefault(shard, []).append(name)
        for shard, names in by_shard.items():
            file = index.parent / shard
            if not file.is_file():
                raise ModelError(f"{index}: shard '{shard}' listed in weight_map is missing")
            self._add_shard(file, names, key=shard)

    def _add_shard(self, file: Path, names: list[str] | None, key: str | None = None) -> None:
        entries = parse_header(file)
        key = key or file.name
        self._files[key] = file
        if names is None:
            names = list(entries)
        for name in names:
            if name not in entries:
                raise ModelError(f"{file}: tensor '{name}' from the index is not in this file")
            self._where[name] = key
            self._entries[name] = entries[name]

    # -- inspection ------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names, in index (or header) order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise ModelError(f"{self.path}: no tensor named '{name}'") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name`` from the header (no data read)."""
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of ``name``."""
        return self._entry(name).dtype

    def nbytes(self, name: str) -> int:
        """Stored size of ``name`` in bytes."""
        return self._entry(name).nbytes

    def total_bytes(self) -> int:
        """Size of all tensors in bytes (what an index's ``total_size`` holds)."""
        return sum(e.nbytes for e in self._entries.values())

    def files(self) -> list[Path]:
        """The safetensors files this checkpoint consists of."""
        return list(self._files.values())

    # -- reading ---------------------------------------------------------------------------
    def _handle(self, shard: str) -> Any:
        with self._lock:
            handle = self._handles.get(shard)
            if handle is None:
                file = self._files[shard]
                try:
                    try:
                        handle = safe_open(str(file), framework="pt", **self._open_kwargs)
                    except TypeError:  # a safetensors without the backend keyword
                        self._open_kwargs = {}
                        handle = safe_open(str(file), framework="pt")
                except Exception as err:  # safetensors raises its own SafetensorError
                    raise ModelError(f"{file}: cannot open ({err})".replace("\n", " ")) from None
                self._handles[shard] = handle
            return handle

    def get(
        self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """Read tensor ``name``, cast to ``dtype`` (if given) and placed on ``device``.

        The result owns its memory (or is a private copy-on-write map): callers may modify it.
        """
        entry = self._entry(name)
        shard = self._where[name]
        try:
            tensor = self._handle(shard).get_tensor(name)
        except ModelError:
            raise
        except Exception as err:
            raise ModelError(f"{self._files[shard]}: cannot read '{name}' ({err})") from None
        target = torch.device(device)
        if dtype is None or dtype == tensor.dtype:
            return tensor.to(target)
        # Move the narrower representation across devices, cast on the other side.
        if target.type != "cpu" and dtype.itemsize > entry.dtype.itemsize:
            return tensor.to(target).to(dtype)
        return tensor.to(dtype).to(target)

    def close(self) -> None:
        """Close the open shard handles (the reader can still be used; it reopens them)."""
        with self._lock:
            handles, self._handles = self._handles, {}
        for handle in handles.values():
            try:
                handle.__exit__(None, None, None)
            except Exception:  # closing is best effort; the handle is dropped either way
                pass

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self._entries)} tensors)"


def _is_plain_relpath(name: str) -> bool:
    """A path inside the model directory (index entries must not point outside it)."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts and "\\" not in name


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


def load_config(model_dir: Path | str) -> dict[str, Any]:
    """The ``config.json`` of ``model_dir`` as a dict; ModelError if missing or invalid."""
    file = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise ModelError(f"{model_dir}: model directory does not exist")
    if not file.is_file():
        raise ModelError(f"{file}: not found (every model directory needs a config.json)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"{file}: cannot read ({err})") from None
    except json.JSONDecodeError as err:
        raise ModelError(f"{file}: invalid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config

