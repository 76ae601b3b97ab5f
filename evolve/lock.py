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

__all__ = ["LOCK_FILE", "RunLock", "RunLocked", "StorageClaim"]

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

        for _ in range(10):
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
            if self._still_named(fd):
                break
            os.close(fd)  # a run that gave the path up removed this file meanwhile: lock the new one
        else:
            raise RunLocked(f"--storage-path '{self.path.parent}': its lock file keeps being replaced")
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def _still_named(self, fd: int) -> bool:
        """Is the locked file still the one at ``self.path``?  A run whose preflight failed in a
        directory it created removes the lock file (:class:`StorageClaim`): a lock taken on the
        removed file meanwhile would protect nothing."""
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

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


class StorageClaim:
    """``with StorageClaim(path) as claim:`` the storage path, locked before anything else runs.

    A run takes it first, before its workers start or anything is scored, so a second run on a
    busy storage path is refused at once (not after minutes of preflight on GPUs it holds).  The
    folder (and missing parents) is created for the lock file; until :meth:`keep` is called (the
    run directory is set up), leaving the block removes again what the claim created: the lock
    file (unless it was there before) and the folders, so a run refused by its preflight leaves
    nothing behind.
    """

    def __init__(self, storage_path: Path) -> None:
        self.path = Path(storage_path)
        self.lock = RunLock(self.path)
        self.created: list[Path] = []
        self.lock_existed = False
        self.previous_holder = b""
        self.kept = False

    def __enter__(self) -> "StorageClaim":
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self.path.mkdir(parents=True, exist_ok=True)
        self.created = missing  # deepest first: the order to remove them in
        self.lock_existed = self.lock.path.exists()
        try:
            self.previous_holder = self.lock.path.read_bytes() if self.lock_existed else b""
        except OSError:
            self.previous_holder = b""
        try:
            self.lock.acquire()
        except BaseException:
            self._undo(holding=False)
            raise
        return self

    def keep(self) -> None:
        """The run directory is set up: leave it (and its lock file) in place from now on."""
        self.kept = True

    def _undo(self, holding: bool) -> None:
        if not self.kept and holding and self.lock.fd is not None:
            if not self.lock_existed:
                self.lock.path.unlink(missing_ok=True)  # while still locked: nobody can be using it
            else:  # the run that wrote it is over: its line back, the folder byte for byte as found
                os.ftruncate(self.lock.fd, 0)
                os.pwrite(self.lock.fd, self.previous_holder, 0)
        for folder in self.created:
            try:
                folder.rmdir()  # only if empty: another process may have put something there
            except OSError:
                break

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        held = self.lock.fd is not None
        try:
            if not self.kept:
                self._undo(holding=held)
        finally:
            self.lock.release()
