"""A worker's side of racing (see :mod:`evolve.racing`): which documents, in which order, and
the chunk-by-chunk scoring of a raced candidate.

Built once per worker for its train tasks: each task's evaluation documents (``limit`` applied
as lm-eval applies it) in the run's seeded order.  :meth:`RaceEvaluation.full` scores every
document and returns the per-document values a later race can pair with; :meth:`RaceEvaluation.race`
scores a candidate chunk by chunk against a :class:`~evolve.racing.RaceJob`.  Tasks that cannot
be raced (groups, metrics that are not a mean over documents, a name listed twice) make
:func:`race_plan` return None with the reason: the worker then scores as usual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from evolve.racing import RaceJob, chunk_ends, doc_order, paired_bound, pareto_stop

__all__ = ["RaceEvaluation", "RaceOutcome", "race_plan"]


@dataclass
class RaceOutcome:
    """Scores (exact, or estimated when stopped), per-document values (when complete) and the
    race's record for the ledger."""

    scores: dict[str, float]
    per_doc: dict[str, list[float]] | None
    documents: int
    documents_full: int
    race: dict[str, Any] | None


def _documents(task: Any, limit: int | float | None) -> int:
    """How many of a leaf task's evaluation documents lm-eval scores under ``limit``."""
    n = len(task.eval_docs)
    if limit is None:
        return n
    return min(n, int(math.ceil(n * limit)) if limit < 1.0 else int(limit))


def _mean_metric(task: Any, metric: str) -> bool:
    from lm_eval.api.metrics import mean

    aggregation = task.aggregation() if hasattr(task, "aggregation") else {}
    return aggregation.get(metric) is mean


def race_plan(tasks: Sequence[Any], task_set: Any, limit: int | float | None, seed: int
              ) -> tuple[dict[str, list[int]] | None, str | None]:
    """(each task's documents in race order, None) or (None, why the tasks cannot be raced)."""
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        return None, "a task is listed twice"
    orders = {}
    for task in tasks:
        leaf = task_set.leaf_tasks.get(task.name)
        if leaf is None:
            return None, f"{task.name!r} is a group"
        metric = task.metric.partition(",")[0]
        if not _mean_metric(leaf, metric):
            return None, f"{task.name!r} metric {task.metric!r} is not a mean over documents"
        orders[task.name] = doc_order(_documents(leaf, limit), seed, task.name)
    return orders, None


class RaceEvaluation:
    """Scores the evaluator's current weights on the race's documents (see the module docstring)."""

    def __init__(self, evaluator: Any, tasks: Sequence[Any], orders: dict[str, list[int]]) -> None:
        self.evaluator = evaluator
        self.tasks = list(tasks)
        self.orders = orders
        self.total = sum(len(o) for o in orders.values())

    def _values(self, spans: dict[str, tuple[int, int]]) -> dict[str, list[float]]:
        samples = {name: self.orders[name][a:b] for name, (a, b) in spans.items() if b > a}
        scored = self.evaluator.evaluate(self.tasks, samples=samples, per_doc=True)
        if scored.error is not None:
            raise ValueError(scored.error)
        return {name: [scored.per_doc[name][d] for d in docs] for name, docs in samples.items()}

    def full(self) -> RaceOutcome:
        """Every document, in race order."""
        values = self._values({name: (0, len(order)) for name, order in self.orders.items()})
        scores = {name: float(np.mean(v)) for name, v in values.items()}
        return RaceOutcome(scores, values, self.total, self.total, None)

    def race(self, job: RaceJob) -> RaceOutcome:
        """Chunk by chunk until the candidate cannot reach ``job.threshold`` or has seen everything."""
        seen: dict[str, list[float]] = {name: [] for name in self.orders}
        ends = {name: chunk_ends(len(order), job.fractions) for name, order in self.orders.items()}
        checks = len(next(iter(ends.values())))
        bound = None
        for k in range(checks):
            spans = {name: (len(seen[name]), ends[name][min(k, len(ends[name]) - 1)]) for name in self.orders}
            for name, values in self._values(spans).items():
                seen[name].extend(values)
            done = sum(len(v) for v in seen.values())
            if done >= self.total:
                break
            bound = paired_bound(seen, job)
            why = pareto_stop(bound, job) if bound.high >= job.threshold else {"why": "threshold"}
            if why is not None:
                race = {"stopped": True, "documents": done, "of": self.total, "estimate": bound.estimate,
                        "low": bound.low, "high": bound.high, "threshold": job.threshold,
                        "reference": job.reference_id, **why}
                return RaceOutcome(bound.scores, None, done, self.total, race)
        scores = {name: float(np.mean(v)) for name, v in seen.items()}
        race = {"stopped": False, "documents": self.total, "of": self.total, "threshold": job.threshold,
                "reference": job.reference_id}
        return RaceOutcome(scores, seen, self.total, self.total, race)
