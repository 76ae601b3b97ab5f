"""Progress of a run on stderr: a live bar on a terminal, plain lines in logs.

On a terminal, a tqdm bar over the evaluation budget (done/total, rate, ETA; the postfix shows
the best fitness, its held-out score, evaluations per minute and failures).  When stderr is not
a terminal (an overnight job's log file) the bar's carriage-return redraws would flood it, so
instead one plain line is written every ``every`` evaluations (default: 5% of the budget) or
when 60 s passed since the last one, and once at the end::

    progress: 37/100 evaluations, best 0.6123 (+0.1873 over parents), held-out 0.6011, 12.3 evals/min, ETA 5m07s, busy 0.98

The gain over the parents (the best minus the best input model's train fitness) shows once the
run's baselines are scored (:mod:`evolve.baselines`).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from evolve.baselines import parent_best_fitness
from evolve.observers.summary import best_train_fitness, train_count

__all__ = ["ProgressObserver"]

PLAIN_INTERVAL_S = 60.0


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class ProgressObserver:
    """Follows a run's records (see the module docstring); ``stream`` defaults to stderr."""

    def __init__(self, budget: int, *, stream: TextIO | None = None, every: int | None = None,
                 interval_s: float = PLAIN_INTERVAL_S) -> None:
        self.budget = budget
        self.stream = stream if stream is not None else sys.stderr
        self.plain = not (hasattr(self.stream, "isatty") and self.stream.isatty())
        self.every = every or max(1, budget // 20)
        self.interval_s = interval_s
        self.bar: Any = None
        self.driver: Any = None
        self.best: float | None = None
        self.held_out: float | None = None
        self.parent: float | None = None  # the best parent's train fitness (baselines)
        self.failed = 0
        self.done = 0
        self.done_this_session = 0
        self.started = time.monotonic()
        self.last_line = (0, self.started)  # (done, time) of the last plain line

    def on_start(self, driver: Any) -> None:
        self.driver = driver
        self.done = train_count(driver.records.values())
        self.best = best_train_fitness(driver.records.values())
        self.parent = parent_best_fitness(driver.records.values())
        self.started = time.monotonic()
        self.last_line = (self.done, self.started)
        if not self.plain:
            from tqdm import tqdm

            self.bar = tqdm(total=max(self.budget, self.done), initial=self.done, desc="evaluations", unit="eval",
                            dynamic_ncols=True, smoothing=0.1, file=self.stream)
            self._refresh()

    def on_record(self, record: dict[str, Any]) -> None:
        if record.get("kind") == "held_out":
            if record["status"] == "ok":
                self.held_out = record["fitness"]
        else:
            if record["status"] == "failed":
                self.failed += 1
            elif self.best is None or record["fitness"] > self.best:
                self.best = record["fitness"]
            self.done += 1
            self.done_this_session += 1
            if self.bar is not None:
                if self.bar.n >= self.bar.total:
                    self.bar.total = self.bar.n + 1
                self.bar.update(1)
        if self.bar is not None:
            self._refresh()
        elif self.done - self.last_line[0] >= self.every or time.monotonic() - self.last_line[1] >= self.interval_s:
            self._line()

    def on_generation(self, number: int, records: list[dict[str, Any]], sigma: float) -> None:
        pass

    def on_new_best(self, record: dict[str, Any], recipe: dict[str, Any], best_config: Any) -> None:
        pass

    def _rate(self) -> float:
        """Evaluations per minute this session."""
        return self.done_this_session / (max(time.monotonic() - self.started, 1e-9) / 60)

    def _refresh(self) -> None:
        postfix = {"best": "-" if self.best is None else f"{self.best:.4f}", "evals/min": f"{self._rate():.1f}"}
        if self.best is not None and self.parent is not None:
            postfix["vs parents"] = f"{self.best - self.parent:+.4f}"
        if self.held_out is not None:
            postfix["held-out"] = f"{self.held_out:.4f}"
        if self.failed:
            postfix["failed"] = self.failed
        self.bar.set_postfix(postfix, refresh=True)

    def line(self) -> str:
        """The plain progress line for the run as it is now."""
        best = "best " + ("-" if self.best is None else f"{self.best:.4f}")
        if self.best is not None and self.parent is not None:
            best += f" ({self.best - self.parent:+.4f} over parents)"
        parts = [f"{self.done}/{self.budget} evaluations", best]
        if self.held_out is not None:
            parts.append(f"held-out {self.held_out:.4f}")
        rate = self._rate()
        parts.append(f"{rate:.1f} evals/min")
        if rate > 0 and self.done < self.budget:
            parts.append(f"ETA {_duration(60 * (self.budget - self.done) / rate)}")
        if self.driver is not None and hasattr(self.driver, "busy_fraction"):
            parts.append(f"busy {self.driver.busy_fraction():.2f}")
        if self.failed:
            parts.append(f"{self.failed} failed")
        return "progress: " + ", ".join(parts)

    def _line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last_line = (self.done, time.monotonic())

    def close(self) -> None:
        """Close the bar (it stays on screen), or write the last plain line."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.driver is not None and self.last_line[0] != self.done:
            self._line()
