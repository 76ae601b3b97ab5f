"""Durable file-system updates shared by the model writer and evolve's run storage.

A rename is atomic, but only an fsync of the directory that holds the new name makes the rename
itself survive a power cut; :func:`atomic_write` does both for one small file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable


def fsync_dir(path: Path | str) -> None:
    """Flush directory ``path`` (the names in it) to disk; best effort.

    Some platforms cannot open a directory and some filesystems refuse to fsync one: the
    renames into it are still atomic there, only not yet durable, so both are ignored.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permission bits a newly created file gets: 0o666 less the umask.

    ``mkstemp`` creates its file 0o600, which would hide a report or a recipe from the group or
    a web server; a file written with :func:`atomic_write` is a new file each time (so one left
    0o600 by an earlier version is readable again after the next write).
    """
    return 0o666 & ~current_umask()


def atomic_write(path: Path | str, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never half of one.

    The data goes to a temporary file in the same directory (a rename across filesystems is not
    atomic), is flushed to disk, renamed over ``path`` and the directory is flushed; the
    temporary file is removed when anything fails, interrupts included.  The file gets the
    permissions any other file would (:func:`new_file_mode`).
    """
    path = Path(path)
    mode = new_file_mode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def real_path(path: Path | str) -> Path:
    """``path`` absolute, with every symlink and ``..`` resolved (it need not exist)."""
    return Path(os.path.realpath(path))


def overlap(a: Path | str, b: Path | str) -> str | None:
    """How ``a`` and ``b`` share files once resolved: "is", "is inside", "contains", or None."""
    ra, rb = real_path(a), real_path(b)
    if ra == rb:
        return "is"
    if rb in ra.parents:
        return "is inside"
    if ra in rb.parents:
        return "contains"
    return None


def refuse_overwrite(out: Path | str, protected: Iterable[tuple[str, Path | str]], what: str) -> None:
    """A MergeError when the output ``out`` (a file or a folder that is replaced whole) is, is
    inside, or contains a ``protected`` path, given as (its description, its path): writing there
    would destroy an input.  ``what`` names the output in the message (a flag or an argument)."""
    from merge_core.errors import MergeError

    for name, path in protected:
        how = overlap(out, path)
        if how is not None:
            raise MergeError(f"{what} '{out}' {how} {name} ({real_path(path)}): writing there would destroy it; "
                             "choose another output path")


# 128 + SIGPIPE: what shells report for a writer whose reader went away (`... | head`).
EXIT_BROKEN_PIPE = 141


def drop_closed_stdout() -> int:
    """After a BrokenPipeError on standard output (its reader, ``head`` say, stopped reading):
    point stdout at /dev/null so the interpreter's last flush does not fail again with a
    traceback; returns :data:`EXIT_BROKEN_PIPE`."""
    import sys

    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (a test's captured stdout)
        pass
    finally:
        os.close(devnull)
    return EXIT_BROKEN_PIPE
