"""One run per storage path: an exclusive lock held for the whole run (and resume).

The lock is ``STORAGE/.lock``, locked with ``flock`` (on NFS Linux turns that into a POSIX byte
range lock, which NFSv3 with lockd and NFSv4 honour across nodes).  The kernel (or the NFS
server) releases it when the holding process dies, however it dies, so there is no stale lock
to clean up: a lock file left by a dead holder is simply locked again by the next run, which
rewrites the holder line.  On NFSv4 a crashed *node's* locks are released when its lease expires
(typically 90 s), so a run restarted elsewhere right after a node crash may be refused for that
long.  The file holds ``pid host start-time`` of the holder, for the refusal message.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from merge_core.errors import MergeError

__all__ = ["LOCK_FILE", "RunLock", "RunLocked"]

LOCK_FILE = ".lock"


class RunLocked(MergeError):
    """Another process holds the storage path (one line naming it)."""


class RunLock:
    """``with RunLock(storage_path):`` holds the storage path's lock, or raises RunLocked.

    The directory must exist.  Re-entrant within a process is not needed and not supported.
    """

    def __init__(self, storage_path: Path) -> None:
        self.path = Path(storage_path) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock (never blocks)."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = self._read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLocked(f"--storage-path '{self.path.parent}' is in use by {holder}; wait for that "
                                "run to end (or stop it), or use another --storage-path") from None
            # A file system without locks (some FUSE mounts): say so, and go on unprotected.
            print(f"merge-evolve: warning: cannot lock {self.path} ({exc.strerror}); make sure no other "
                  "run uses this storage path", file=sys.stderr)
            return self
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    @staticmethod
    def _read_holder(fd: int) -> str:
        try:
            text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
        except OSError:
            text = ""
        return text or "another process (it has not written its name yet)"

    def release(self) -> None:
        """Let the lock go (the holder line stays: harmless, rewritten by the next holder)."""
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
