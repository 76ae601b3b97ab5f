"""Keeps ``STORAGE/report.html`` (:mod:`evolve.html_report`) current while a run goes.

The report is redrawn in a background thread on each new best and each tell batch (requests that arrive while one
is being drawn, or in the pause after it, are folded into one more drawing), so the search loop
never waits for it, and once more, in the foreground, when the run closes (also after an error).
After each drawing the thread pauses ``PAUSE_FACTOR`` times as long as it took, so that a fast
run (the toy's bests come seconds apart) leaves its CPU to the workers.  A report that cannot
be drawn or written is logged on stderr, once per reason, and never stops the run; a missing
module (matplotlib in an environment installed without the project's dependencies) is said
once, and no drawing is tried again.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

from evolve.protocols import one_line

__all__ = ["PAUSE_FACTOR", "HtmlReportObserver"]

PAUSE_FACTOR = 4.0  # the drawing thread takes at most 1 / (1 + PAUSE_FACTOR) of one core


class HtmlReportObserver:
    """Search observer that writes the HTML report (see the module docstring)."""

    def __init__(self, storage_path: Path) -> None:
        self.storage_path = Path(storage_path)
        self.path: Path | None = None  # the last report written
        self.errors = 0
        self.warned: set[str] = set()  # the reasons already told
        self.missing: str | None = None  # a module the report needs and cannot import: no more tries
        self._wanted = threading.Event()
        self._closing = threading.Event()
        self._stop = False
        self._lock = threading.Lock()  # one drawing at a time
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        with self._lock:
            if self.missing is not None:
                return
            try:
                from evolve.html_report import write_html_report

                self.path = write_html_report(self.storage_path, live=not self._stop)
            except Exception as exc:  # the report must never stop a run
                self.errors += 1
                reason = one_line(exc)
                if isinstance(exc, ImportError):
                    self.missing = exc.name or reason
                    reason += (f" (install it, e.g. `pip install {exc.name}`, for STORAGE/report.html; the run goes "
                               "on without the report)" if exc.name else " (the run goes on without the report)")
                if reason not in self.warned:
                    self.warned.add(reason)
                    print(f"merge-evolve: warning: could not write the HTML report: {reason}", file=sys.stderr)

    def _loop(self) -> None:
        while True:
            self._wanted.wait()
            if self._stop:
                return
            self._wanted.clear()
            started = time.monotonic()
            self._write()
            if self._closing.wait(PAUSE_FACTOR * (time.monotonic() - started)):
                return

    def on_start(self, driver: Any) -> None:
        self._thread = threading.Thread(target=self._loop, name="html-report", daemon=True)
        self._thread.start()
        self._wanted.set()  # a first page as soon as the run opens (a resumed run's history)

    def on_record(self, record: dict[str, Any]) -> None:
        pass

    def on_generation(self, number: int, records: list[dict[str, Any]], sigma: float) -> None:
        self._wanted.set()  # the trace, timeline and failures move on after the last new best too

    def on_new_best(self, record: dict[str, Any], recipe: dict[str, Any], best_config: Any) -> None:
        self._wanted.set()

    def close(self) -> None:
        """Stop the background drawing and write the final report."""
        self._stop = True
        self._closing.set()
        self._wanted.set()
        started, self._thread = self._thread, None
        if started is not None:
            started.join()
        if started is not None or (self.storage_path / "evaluations.jsonl").exists():
            self._write()
