"""Leave no Ray process behind when the driver that started a local Ray dies, however it dies.

``ray.shutdown()`` stops a local Ray cleanly, but a driver killed with SIGKILL (or OOM-killed)
runs no code: Ray's raylet and GCS notice and exit, yet helpers such as the dashboard agent
and the runtime-env agent were seen to outlive it.  So a pool that starts a local Ray also
starts this watchdog in its own session (:func:`start_reaper`).  It holds the read end of a
pipe whose write end only the driver has: the pipe closes when the driver exits for any reason.
Meanwhile, every second, it notes the session's processes: those whose command line names the
Ray session's directory (raylet, GCS, agents, log monitor) and their descendants (the actors).
When the pipe closes it terminates those that are still alive, and any new ones (SIGTERM, then
SIGKILL after 3 s).  Nothing else of the driver's is touched (a clean ``ray.shutdown()`` leaves
nothing to do).

What no process can clean up: a SIGKILL sent to the reaper too (e.g. killing the whole
process group at once), or a process that left the session (a new session and parent)
in the last second before the driver died.
"""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import time
from typing import Any

__all__ = ["start_reaper", "stop_reaper"]

POLL_S = 1.0
GRACE_S = 3.0


def start_reaper(session_dir: str) -> subprocess.Popen:
    """Start the watchdog of the local Ray session in ``session_dir`` (see the module docstring).

    The returned process's ``_evolve_pipe`` is the write end: close it (``stop_reaper``) after a
    clean shutdown.
    """
    read_end, write_end = os.pipe()
    cmd = [sys.executable, "-m", "evolve.workers.reaper", "--parent", str(os.getpid()), "--fd", str(read_end),
           "--session-dir", session_dir]
    proc = subprocess.Popen(cmd, pass_fds=(read_end,), start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)
    os.close(read_end)
    # The write end stays open, unused, for as long as this process lives (not inherited by
    # children: os.pipe descriptors are non-inheritable).
    proc._evolve_pipe = write_end  # type: ignore[attr-defined]
    return proc


def stop_reaper(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Close the pipe (the reaper then removes what a shutdown left) and wait for it."""
    pipe = getattr(proc, "_evolve_pipe", None)
    if pipe is not None:
        os.close(pipe)
        proc._evolve_pipe = None  # type: ignore[attr-defined]
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def _session_processes(psutil: Any, session_dir: str) -> dict[int, Any]:
    """The processes naming ``session_dir`` on their command line, and their descendants."""
    found: dict[int, Any] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(session_dir in part for part in proc.info["cmdline"] or ()):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return found


def _note(psutil: Any, noted: dict[int, float], session_dir: str) -> None:
    for pid, proc in _session_processes(psutil, session_dir).items():
        try:
            noted.setdefault(pid, proc.create_time())
        except psutil.Error:
            continue


def _reap(psutil: Any, noted: dict[int, float], session_dir: str) -> None:
    victims = _session_processes(psutil, session_dir)
    for pid, created in noted.items():
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 1e-3:  # not a reused pid
                victims.setdefault(pid, proc)
        except psutil.Error:
            continue
    for proc in victims.values():
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(victims.values()), timeout=GRACE_S)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


def main(argv: list[str] | None = None) -> int:
    """Watch ``--parent`` until the pipe ``--fd`` closes, then reap (see the module docstring)."""
    import psutil

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--session-dir", required=True)
    args = ap.parse_args(argv)
    noted: dict[int, float] = {}
    while True:
        _note(psutil, noted, args.session_dir)
        ready, _, _ = select.select([args.fd], [], [], POLL_S)
        if ready and not os.read(args.fd, 64):  # EOF: the driver is gone (or closed the pool)
            break
    time.sleep(0.2)  # a clean shutdown is usually done by now: only leftovers remain
    _reap(psutil, noted, args.session_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
