"""Keeping lm-eval quiet while it scores the same model thousands of times.

lm-eval logs INFO/WARNING lines and draws tqdm bars on every call; over a night's run that is
megabytes of noise.  :func:`quiet` silences both for the duration of a call and restores the
process's logging setup afterwards.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator
from typing import TextIO

__all__ = ["DropProgressBars", "quiet", "quiet_lm_eval", "transformers_quiet"]


@contextlib.contextmanager
def quiet_lm_eval(enabled: bool = True) -> Iterator[None]:
    """Raise lm-eval's logger to ERROR for the duration (its INFO/WARNING lines are per-call noise).

    The previous level is restored on exit, so the process-wide logging setup is left as found.
    """
    if not enabled:
        yield
        return
    logger = logging.getLogger("lm_eval")
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


class DropProgressBars(io.TextIOBase):
    """A stderr stand-in that drops tqdm bars and passes everything else through.

    The per-task "building contexts" bar in lm-eval's Task.build_all_requests has no switch
    (tqdm reads TQDM_DISABLE only when it is first imported).  tqdm redraws start with "\\r"
    and a closing bar writes a lone newline; other text goes to the real stderr.
    """

    def __init__(self, target: TextIO) -> None:
        self._target = target
        self._after_bar = False

    def write(self, text: str) -> int:
        if "\r" in text:
            self._after_bar = True
            return len(text)
        if self._after_bar and not text.strip():
            self._after_bar = False
            return len(text)
        self._after_bar = False
        return self._target.write(text)

    def flush(self) -> None:
        self._target.flush()

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def quiet(enabled: bool) -> Iterator[None]:
    """lm-eval's log lines and progress bars off for the duration (no-op when not ``enabled``)."""
    if not enabled:
        yield
        return
    with quiet_lm_eval(), contextlib.redirect_stderr(DropProgressBars(sys.stderr)):
        yield


@contextlib.contextmanager
def transformers_quiet(enabled: bool = True) -> Iterator[None]:
    """transformers' own log lines (model-type and loading notes) at ERROR for the duration."""
    if not enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)
