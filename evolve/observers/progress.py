"""A terminal progress bar for a run: evaluations done / budget, best so far, rate and ETA."""

from __future__ import annotations

import time
from typing import Any

from evolve.observers.summary import best_train_fitness, train_count


class ProgressObserver:
    """tqdm bar over the evaluation budget, fed by the search driver's hooks.

    tqdm itself shows done/total, evaluations per minute (``unit_scale`` on a minute clock is
    not available, so the rate is computed here) and the ETA; the postfix carries the best
    fitness, its held-out score and the number of failed candidates.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.bar: Any = None
        self.best: float | None = None
        self.held_out: float | None = None
        self.failed = 0
        self.done_this_session = 0
        self.started = time.monotonic()

    def on_start(self, driver: Any) -> None:
        from tqdm import tqdm

        done = train_count(driver.records.values())
        self.best = best_train_fitness(driver.records.values())
        self.bar = tqdm(total=max(self.budget, done), initial=done, desc="evaluations", unit="eval",
                        dynamic_ncols=True, smoothing=0.1)
        self._refresh()

    def on_record(self, record: dict[str, Any]) -> None:
        if self.bar is None:
            return
        if record.get("kind") == "held_out":
            if record["status"] == "ok":
                self.held_out = record["fitness"]
            self._refresh()
            return
        if record["status"] == "failed":
            self.failed += 1
        elif self.best is None or record["fitness"] > self.best:
            self.best = record["fitness"]
        self.done_this_session += 1
        if self.bar.n >= self.bar.total:
            self.bar.total = self.bar.n + 1
        self.bar.update(1)
        self._refresh()

    def on_generation(self, number: int, records: list[dict[str, Any]], sigma: float) -> None:
        pass

    def on_new_best(self, record: dict[str, Any], recipe: dict[str, Any], best_config: Any) -> None:
        pass

    def _refresh(self) -> None:
        minutes = max(time.monotonic() - self.started, 1e-9) / 60
        postfix = {"best": "-" if self.best is None else f"{self.best:.4f}",
                   "evals/min": f"{self.done_this_session / minutes:.1f}"}
        if self.held_out is not None:
            postfix["held-out"] = f"{self.held_out:.4f}"
        if self.failed:
            postfix["failed"] = self.failed
        self.bar.set_postfix(postfix, refresh=True)

    def close(self) -> None:
        """Close the bar (it stays on screen)."""
        if self.bar is not None:
            self.bar.close()
