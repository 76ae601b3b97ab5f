"""Durable file-system updates shared by the model writer and evolve's run storage.

A rename is atomic, but only an fsync of the directory that holds the new name makes the rename
itself survive a power cut; :func:`atomic_write` does both for one small file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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


def atomic_write(path: Path | str, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never half of one.

    The data goes to a temporary file in the same directory (a rename across filesystems is not
    atomic), is flushed to disk, renamed over ``path`` and the directory is flushed; the
    temporary file is removed when anything fails, interrupts included.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
