"""The contracts between the search driver, the evaluation pools and the observers.

Standard library only: every Ray actor imports this module (through :mod:`evolve.workers`), and
the driver, the pools and the observers depend on it instead of on each other.

- :class:`Result`: what a pool reports for one job (the same type in-process and from actors).
- :class:`EvaluationPool`: workers that merge and score recipes; the driver keeps
  ``num_workers`` jobs in flight.
- :class:`SearchObserver`: hooks that follow a run (progress bar, W&B).
- ``TRAIN`` / ``HELD_OUT``: the two task sets a job is scored on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from merge_core.errors import one_line

__all__ = ["HELD_OUT", "TRAIN", "EvaluationPool", "Result", "SearchObserver", "one_line"]

TRAIN = "train"
HELD_OUT = "held_out"


@dataclass
class Result:
    """What an evaluation pool reports for one submitted job."""

    eval_id: str
    status: str = "ok"  # "ok" or "failed"
    # {task: {metric: value}}, or flat {task: value} / {"task:metric": value} (see task_score)
    scores: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    worker: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    node: str | None = None  # the machine (Ray node id) that ran it, where the pool knows
    # Racing (evolve.racing): documents scored of all, every document's value when scored on all
    # (task -> values in race order), and the race's outcome when the job was raced.
    documents: int | None = None
    documents_full: int | None = None
    per_doc: dict[str, list[float]] | None = None
    race: dict[str, Any] | None = None
    note: str | None = None  # how it was scored, where not as asked (kept in the ledger record)


class EvaluationPool(Protocol):
    """Workers that merge a recipe and score it; the driver keeps ``num_workers`` jobs in flight."""

    num_workers: int

    def submit(self, eval_id: str, recipe: dict[str, Any], task_set: str, race: Any = None) -> None:
        """Start a job; ``task_set`` is :data:`TRAIN` (config.tasks) or :data:`HELD_OUT`;
        ``race`` an :class:`evolve.racing.RaceJob` to score it chunk by chunk against."""

    def wait_any(self) -> list[Result]:
        """Block until at least one submitted job finished; return the finished ones."""

    def release_idle(self, keep: int = 0) -> None:
        """The run has no more work for idle workers: free all but ``keep`` of them (their GPUs
        go back to the cluster).  A later submit may start a worker again.  Optional: the
        driver calls it only where a pool has it."""

    def close(self) -> None:
        """Release the workers (idempotent)."""


class SearchObserver(Protocol):
    """Follows a run as it goes (progress bar, W&B); every hook must be cheap and must not raise."""

    def on_start(self, driver: Any) -> None:
        """Called once the run is opened (resumed records are in ``driver.records``)."""

    def on_record(self, record: dict[str, Any]) -> None:
        """A ledger record was appended (train, cached or held-out)."""

    def on_generation(self, number: int, records: list[dict[str, Any]], sigma: float) -> None:
        """Generation ``number`` was told to the strategy; ``records`` are its candidates in order."""

    def on_new_best(self, record: dict[str, Any], recipe: dict[str, Any], best_config: Any) -> None:
        """A new incumbent; ``best_config`` is the path of the rewritten best_config.yaml."""

    def close(self) -> None:
        """The run is over (also after an error): flush and release what the observer holds."""
