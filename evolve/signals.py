"""Stopping a run on a signal the way a cluster scheduler stops it: cleanly, resumably, once.

Slurm, Kubernetes, systemd and ``docker stop`` send SIGTERM (then SIGKILL after a grace period,
typically 30 s); a closed terminal or ssh session sends SIGHUP; Ctrl-C sends SIGINT.  All three
end a run alike: the first one raises :class:`Interrupted` in the main thread (a
``KeyboardInterrupt``, so every cleanup that survives Ctrl-C survives these), which stops
asking, cancels the candidates on the workers (they were asked in the ledger and are submitted
again when the run resumes: nothing is lost), closes the workers, and exits with ``128 +
signal`` after one line saying how to resume: 130 for SIGINT, 129 for SIGHUP, 143 for SIGTERM,
the statuses shells report for a process those signals end, which schedulers read as
"terminated", not "failed".  A second signal while that cleanup runs ends the process at once
(the signal's default action, set by the first: the shell reports the same status): the ledger
is appended whole line by whole line and every other file is replaced atomically, so an abrupt
end loses only the candidates in flight, as a SIGKILL would.

Ray's ``ray.init`` installs its own SIGTERM handler (``sys.exit``, a traceback and exit 15 in a
driver); :func:`install` is called again once the workers are up.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Iterator

__all__ = ["HANDLED", "Interrupted", "exit_status", "install", "signal_name", "stop_on_signals"]

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_received: list[int] = []  # signals seen by this process; a second one ends it at once
_active: list[bool] = []  # inside stop_on_signals (a list: no module-level rebinding)


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal (``signum``); raised once, in the main thread."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_status(exc: BaseException) -> int:
    """The exit status of a run stopped by ``exc``: 128 + the signal that stopped it.

    The signal is looked up in what this module received, not only in ``exc``: Ray turns any
    KeyboardInterrupt raised while it waits (ours included) into a plain one.  A plain
    KeyboardInterrupt with no signal seen is Ctrl-C's SIGINT.
    """
    if isinstance(exc, Interrupted):
        return 128 + exc.signum
    return 128 + (_received[0] if _received else int(signal.SIGINT))


def signal_name(status: int) -> str:
    """"SIGTERM" for 143, and so on: the signal of an :func:`exit_status`."""
    return signal.Signals(status - 128).name


def _handle(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    # A second signal must end the process at once, even while the main thread is blocked in C
    # code (a Python handler would wait for it to return): the default action from now on.
    for other in HANDLED:
        signal.signal(other, signal.SIG_DFL)
    raise Interrupted(signum)


def install() -> None:
    """Handle SIGINT, SIGTERM and SIGHUP as the module docstring says (main thread only: Python
    delivers signals there; elsewhere this does nothing).  Called again after a library that
    sets its own handlers (``ray.init``).  Outside :func:`stop_on_signals` it does nothing."""
    if not _active or _received or threading.current_thread() is not threading.main_thread():
        return  # (after a first signal the default action stays: the next one ends the process)
    for signum in HANDLED:
        if signum == signal.SIGHUP and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
            continue  # started under nohup: the user asked for SIGHUP to be ignored
        signal.signal(signum, _handle)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM/SIGHUP stop the run (:func:`install`); the handlers
    found before are restored after it (callers in the same process, such as tests, keep theirs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in HANDLED}
    _received.clear()
    _active.append(True)
    install()
    try:
        yield
    except KeyboardInterrupt as exc:
        if not isinstance(exc, Interrupted) and _received:  # Ray re-raised ours as a plain one
            raise Interrupted(_received[0]) from None
        raise
    finally:
        _active.pop()
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        _received.clear()
