"""Crash-safe, sharded writing of a merged model directory.

Everything is written into a hidden sibling of the destination
(``.<name>.tmp-<pid>``) and renamed into place only by :meth:`ShardedModelWriter.finalize`, so
an interrupted or failed merge never leaves a directory that looks like a complete model.

Memory: the safetensors format puts the header (every tensor's offsets) before the data, so
a shard can only be written once all of its tensors are known.  Two modes:

* Declared (what ``merge-yaml`` uses): the caller announces every tensor's name, dtype and
  shape up front with :meth:`ShardedModelWriter.declare`.  Shard boundaries and headers are
  then known before any data exists, and each added tensor is written by a background thread
  straight to its final offset in its shard file: nothing is buffered beyond a bounded queue,
  and disk writes overlap the caller's work.
* Undeclared: tensors are buffered in memory until the next one would push the shard past
  ``max_shard_size`` bytes, then the shard is written (peak memory about one shard).

Both modes produce byte-identical files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from merge_core.errors import MergeError, ModelError
from merge_core.fsutil import fsync_dir
from merge_core.safetensors_writer import (
    ShardFile,
    ShardStream,
    TensorSlot,
    numel_of,
    safetensors_layout,
    write_safetensors,
)
from merge_core.tensor_io import TORCH_TO_SAFETENSORS

_SIZE_RE = re.compile(r"^(\d+)([kmb]?)$", re.IGNORECASE | re.ASCII)
_MULTIPLIERS = {"": 1, "k": 1000, "m": 1000**2, "b": 1000**3}
_WEIGHT_NAME_RE = re.compile(r"^(model|pytorch_model)([-.].*)?\.(safetensors|bin)(\.index\.json)?$")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
"""Files :func:`copy_tokenizer_files` copies when present (plus ``additional_chat_templates/``)."""


def parse_size(value: str | int) -> int:
    """Parse a shard size the way ``mergekit-yaml --out-shard-size`` does.

    An integer with an optional decimal suffix: ``K`` = 10**3, ``M`` = 10**6, ``B`` = 10**9
    (case-insensitive; "B" is billion, not byte).  mergekit's help calls it a number of
    parameters, but its writer compares it with tensor *bytes* (``numel * element_size``), so
    the value is a byte budget per shard: ``5B`` is 5 GB, i.e. 2.5B bf16 parameters.  We do
    the same.  A size of 0 (or less, programmatically) means one shard for everything.
    Decimals ("1.5B") and other suffixes ("5G", "5GB") are rejected like mergekit rejects them.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 5B, 500M or 1000000, got {value!r}")
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value).strip())
    if not match:
        raise ValueError(
            f"cannot parse {value!r}: expected an integer with an optional K, M or B "
            "suffix (decimal multiples of bytes), e.g. 5B or 500M"
        )
    return int(match.group(1)) * _MULTIPLIERS[match.group(2).lower()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (before the rename that publishes it).

    Done once at the end rather than per shard: the kernel writes shards back in the
    background while later tensors are merged, so these calls mostly find clean pages.
    """
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def _looks_like_model_dir(path: Path) -> bool:
    names = {p.name for p in path.iterdir()}
    if not names:
        return True
    markers = {"config.json", "mergekit_config.yml", "model.safetensors.index.json"}
    return bool(names & markers) or any(_WEIGHT_NAME_RE.match(n) for n in names)


class ShardedModelWriter:
    """Write a model directory (weights in shards plus text files) atomically.

    ``with ShardedModelWriter(out_dir, parse_size("5B")) as w: w.add(...); w.finalize()``.
    Leaving the ``with`` block by an exception removes the temporary directory and leaves the
    destination untouched; leaving it normally finalizes if :meth:`finalize` was not called.

    An existing ``out_dir`` is replaced as a whole at finalize (mergekit writes into it,
    mixing old and new shards): the old directory is renamed aside, the new one renamed in,
    then the old one deleted.  To avoid deleting something precious by a typo, an existing
    non-empty directory that does not look like a model (no config.json, weights or
    mergekit_config.yml) is refused at construction, before any work is done.
    ``fsync`` flushes every file to disk before the rename, so a power cut cannot leave a
    renamed directory with empty files (it costs waiting for the disk: on a 320 MB/s disk, 0.3 s
    of a 3 s merge of a 1 GB model).  Without it the rename still guarantees that an interrupted
    process never leaves a complete-looking directory; only an OS crash could.
    Tensors passed to :meth:`add` are kept by reference until their shard is written: do not
    modify them in place afterwards.
    """

    def __init__(
        self,
        out_dir: Path | str,
        max_shard_size: int,
        safe_serialization: bool = True,
        *,
        fsync: bool = True,
    ) -> None:
        self.out_dir = Path(os.path.realpath(out_dir))
        self.max_shard_size = max_shard_size
        self.safe_serialization = safe_serialization
        self.fsync = fsync
        self._check_destination()
        parent = self.out_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale_siblings()
        self.tmp_dir = parent / f".{self.out_dir.name}.tmp-{os.getpid()}"
        if self.tmp_dir.exists():  # leftover of this very process (pids are unique while alive)
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir()
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self._names: set[str] = set()
        self.total_size = 0
        self._stream: ShardStream | None = None
        self._state = "open"

    # -- setup -----------------------------------------------------------------------------
    def _check_destination(self) -> None:
        out = self.out_dir
        if out.exists() and not out.is_dir():
            raise MergeError(f"{out}: output path exists and is not a directory")
        if out.is_dir() and not _looks_like_model_dir(out):
            raise MergeError(
                f"{out}: output directory exists, is not empty and does not look like a model "
                "(no config.json or weights); refusing to replace it"
            )

    def _remove_stale_siblings(self) -> None:
        """Delete temp/aside dirs left by killed runs (their pid is no longer alive)."""
        pattern = re.compile(rf"^\.{re.escape(self.out_dir.name)}\.(tmp|old)-(\d+)$")
        for entry in self.out_dir.parent.iterdir():
            match = pattern.match(entry.name)
            if match and entry.is_dir() and not _pid_alive(int(match.group(2))):
                shutil.rmtree(entry, ignore_errors=True)

    # -- tensors ---------------------------------------------------------------------------
    def declare(self, specs: Iterable[tuple[str, torch.dtype, Sequence[int]]]) -> None:
        """Announce every tensor, as ``(name, dtype, shape)`` in the order they will be added.

        Shards are cut exactly as :meth:`add` would cut them; afterwards each added tensor is
        written by a background thread directly to its place in its shard file instead of
        being buffered (``add`` waits only while over ~64 MB are queued).  Every declared
        tensor must then be added, with the declared dtype and shape, and no other; the
        output is byte-identical to the undeclared mode.  Call once, before adding anything.
        """
        self._require_open()
        if self._names or self._stream is not None:
            raise RuntimeError("declare() must be called once, before any tensor is added")
        if not self.safe_serialization:
            raise ValueError("declare() needs safe_serialization (safetensors output)")
        groups: list[dict[str, tuple[torch.dtype, tuple[int, ...]]]] = []
        current: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        current_bytes = 0
        seen: set[str] = set()
        for name, dtype, shape in specs:
            if not isinstance(name, str) or not name or name in seen:
                raise ValueError(f"declared tensor name {name!r} is empty or repeated")
            if dtype not in TORCH_TO_SAFETENSORS:
                raise ValueError(f"tensor '{name}': dtype {dtype} cannot be stored in safetensors")
            seen.add(name)
            nbytes = numel_of(shape) * dtype.itemsize
            if current and self.max_shard_size > 0 and current_bytes + nbytes > self.max_shard_size:
                groups.append(current)
                current, current_bytes = {}, 0
            current[name] = (dtype, tuple(int(d) for d in shape))
            current_bytes += nbytes
        if current:
            groups.append(current)
        shards: list[ShardFile] = []
        slots: dict[str, TensorSlot] = {}
        for i, group in enumerate(groups, start=1):
            prefix, offsets, data = safetensors_layout(group, {"format": "pt"})
            part = f"{self._basename()}.part-{i:05d}.safetensors"
            shard = ShardFile(part, list(group), prefix, len(prefix) + data, len(group))
            shards.append(shard)
            for name, (dtype, shape) in group.items():
                slots[name] = TensorSlot(shard, len(prefix) + offsets[name], dtype, shape)
        # Without fsync the early writeback hints would only make this thread wait for the disk.
        self._stream = ShardStream(self.tmp_dir, shards, slots, writeback=self.fsync)
        self._stream.start()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` under ``name``; writes the current shard first if it would overflow.

        Like mergekit, a shard is closed when adding the tensor would exceed
        ``max_shard_size`` bytes; a tensor larger than the limit gets a shard of its own.
        """
        self._require_open()
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name must be a non-empty string, got {name!r}")
        if name in self._names:
            raise ValueError(f"tensor '{name}' was already added")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.resolve_conj().resolve_neg().contiguous()
        if self.safe_serialization and t.dtype not in TORCH_TO_SAFETENSORS:
            raise ValueError(f"tensor '{name}': dtype {t.dtype} cannot be stored in safetensors")
        nbytes = t.numel() * t.element_size()
        if t.untyped_storage().nbytes() > nbytes:
            # A view into a larger buffer: copy it, so the buffer's accounting is honest and a
            # caller reusing that buffer for the next tensor cannot change what we write.
            t = t.clone()
        if self._stream is not None:
            slot = self._stream.slots.get(name)
            if slot is None:
                raise ValueError(f"tensor '{name}' was not declared")
            if t.dtype != slot.dtype or tuple(t.shape) != slot.shape:
                raise ValueError(
                    f"tensor '{name}' is {t.dtype} {list(t.shape)}, "
                    f"declared {slot.dtype} {list(slot.shape)}"
                )
            self._stream.put(name, t)
            self._names.add(name)
            self.total_size += nbytes
            return
        if (
            self._buffer
            and self.max_shard_size > 0
            and self._buffer_bytes + nbytes > self.max_shard_size
        ):
            self._flush()
        self._names.add(name)
        self._buffer[name] = t
        self._buffer_bytes += nbytes

    @property
    def buffered_bytes(self) -> int:
        """Bytes of added tensors not yet written (the shard buffer, or the writer's queue)."""
        if self._stream is not None:
            return self._stream.queued_bytes
        return self._buffer_bytes

    def _finish_stream(self) -> None:
        """Declared mode: wait for the background writes, check everything declared came."""
        stream = self._stream
        assert stream is not None
        stream.close()
        missing = [n for n in stream.slots if n not in self._names]
        if missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise ValueError(f"{len(missing)} declared tensors were never added ({shown})")
        self._shards = [(shard.part, shard.names) for shard in stream.shards]

    def _flush(self) -> None:
        if not self._buffer:
            return
        ext = "safetensors" if self.safe_serialization else "bin"
        part = f"{self._basename()}.part-{len(self._shards) + 1:05d}.{ext}"
        path = self.tmp_dir / part
        if self.safe_serialization:
            write_safetensors(path, self._buffer, {"format": "pt"})
        else:
            torch.save(self._buffer, path)
        self._shards.append((part, list(self._buffer)))
        self.total_size += self._buffer_bytes
        self._buffer = {}
        self._buffer_bytes = 0

    def _basename(self) -> str:
        return "model" if self.safe_serialization else "pytorch_model"

    # -- other files -----------------------------------------------------------------------
    def _target(self, relpath: str | Path) -> Path:
        rel = Path(relpath)
        if rel.is_absolute() or not rel.parts or ".." in rel.parts or str(rel) in ("", "."):
            raise ValueError(f"{relpath!s}: must be a relative path inside the output directory")
        if _WEIGHT_NAME_RE.match(rel.name):
            raise ValueError(f"{relpath!s}: weight file names are reserved for the writer")
        target = self.tmp_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def write_text(self, relpath: str | Path, text: str) -> None:
        """Write a UTF-8 text file (config.json, README.md, ...) into the output."""
        self._require_open()
        target = self._target(relpath)
        target.write_text(text, encoding="utf-8")

    def copy_file(self, src: Path | str, relpath: str | Path | None = None) -> None:
        """Copy ``src`` into the output as ``relpath`` (default: its file name)."""
        self._require_open()
        src = Path(src)
        if not src.is_file():
            raise ModelError(f"{src}: file not found")
        target = self._target(relpath if relpath is not None else src.name)
        shutil.copyfile(src, target)

    # -- lifecycle -------------------------------------------------------------------------
    def _require_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"writer for {self.out_dir} is already {self._state}")

    def finalize(self) -> Path:
        """Write the last shard, name shards like transformers, and move the output into place.

        One shard is ``model.safetensors``; N shards are ``model-0000i-of-0000N.safetensors``
        plus ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``).
        """
        self._require_open()
        try:
            if self._stream is not None:
                self._finish_stream()
            self._flush()
            if not self._shards:
                raise ValueError("no tensors were added; refusing to write a model without weights")
            self._name_shards()
            if self.fsync:
                _fsync_tree(self.tmp_dir)
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        self._state = "finalized"
        return self.out_dir

    def _name_shards(self) -> None:
        base = self._basename()
        ext = "safetensors" if self.safe_serialization else "bin"
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, (part, names) in enumerate(self._shards, start=1):
            final = f"{base}.{ext}" if count == 1 else f"{base}-{i:05d}-of-{count:05d}.{ext}"
            os.replace(self.tmp_dir / part, self.tmp_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        if count > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": dict(sorted(weight_map.items())),
            }
            index_path = self.tmp_dir / f"{base}.{ext}.index.json"
            index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    def _move_into_place(self) -> None:
        out = self.out_dir
        aside = None
        if out.exists():
            # Re-check: the directory may have appeared or changed while we merged.
            self._check_destination()
            aside = out.parent / f".{out.name}.old-{os.getpid()}"
            if aside.exists():
                shutil.rmtree(aside)
            os.rename(out, aside)
        try:
            os.rename(self.tmp_dir, out)
        except BaseException:
            if aside is not None:
                os.rename(aside, out)  # put the previous output back
            raise
        if self.fsync:
            fsync_dir(out.parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    def abort(self) -> None:
        """Discard everything written so far; the destination is left as it was."""
        if self._state == "finalized":
            return
        self._state = "aborted"
        self._buffer = {}
        if self._stream is not None:
            self._stream.discard()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> ShardedModelWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.finalize()


def copy_tokenizer_files(src_model_dir: Path | str, writer: ShardedModelWriter) -> list[str]:
    """Copy the tokenizer (and generation_config.json) of ``src_model_dir`` into the output.

    Copies the files in :data:`TOKENIZER_FILES` that exist, plus the
    ``additional_chat_templates/`` folder newer transformers versions write; returns the
    relative paths copied.
    """
    src = Path(src_model_dir)
    copied: list[str] = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            writer.copy_file(src / name, name)
            copied.append(name)
    extra = src / "additional_chat_templates"
    if extra.is_dir():
        for file in sorted(p for p in extra.rglob("*") if p.is_file()):
            rel = file.relative_to(src).as_posix()
            writer.copy_file(file, rel)
            copied.append(rel)
    return copied
