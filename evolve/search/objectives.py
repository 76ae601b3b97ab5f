"""What a search optimizes: the weighted sum or each task (a Pareto front), under per-task floors.

- Floors (``tasks: - {name: ..., min: 0.95}``, either mode): a successful candidate scoring
  below a floor is *infeasible*; its ledger record carries ``violation``, the sum over floored
  tasks of how far it is below (0: feasible).  Every feasible candidate ranks before every
  infeasible one, infeasible ones rank by their violation, failed ones last.
- ``weighted`` (the default): the strategy is told the weighted fitness; an infeasible
  candidate is told ``floor - v / (1 + v)`` (``floor``: the lowest weighted fitness metrics in
  [0, 1] can give, ``v``: its violation), below every feasible one and above a failure's penalty.
- ``pareto``: each task's metric is an objective (maximized); the strategy is told
  :class:`Told` (the objective vector and the violation).  The front is the non-dominated set
  of the feasible candidates scored on every document.

The incumbent (``best_config.yaml``) in either mode is the best feasible candidate by weighted
fitness (the least violating one while none is feasible).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from evolve.config import EvolveConfig, TaskConfig
from evolve.racing import stopped_early
from evolve.search.fitness import is_finite_number, task_score

__all__ = ["FAILED_OBJECTIVE", "PARETO", "WEIGHTED", "Objectives", "Told", "dominates", "hypervolume",
           "non_dominated", "violation"]

WEIGHTED, PARETO = "weighted", "pareto"
# The objective value a failed candidate gets on every task: below any metric in [0, 1].
FAILED_OBJECTIVE = -1.0


@dataclass(frozen=True)
class Told:
    """What a multi-objective strategy is told about one point."""

    values: tuple[float, ...]  # one per task, maximized (FAILED_OBJECTIVE everywhere when it failed)
    violation: float  # 0: feasible; a failure: above every violation metrics in [0, 1] can give
    failed: bool = False


def violation(tasks: Sequence[TaskConfig], scores: Mapping[str, Any]) -> float:
    """How far ``scores`` fall below the tasks' floors, summed (0.0: feasible)."""
    total = 0.0
    for task in tasks:
        if task.min is None:
            continue
        value = task_score(dict(scores), task)
        if not is_finite_number(value):
            return math.inf
        total += max(float(task.min) - float(value), 0.0)
    return total


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is at least as good everywhere and better somewhere (maximizing)."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def non_dominated(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates (the first of equal points only)."""
    keep = []
    for i, p in enumerate(points):
        if any(dominates(q, p) for q in points):
            continue
        if any(tuple(points[j]) == tuple(p) for j in keep):
            continue
        keep.append(i)
    return keep


def hypervolume(points: Iterable[Sequence[float]], reference: Sequence[float]) -> float:
    """The volume dominated by ``points`` and bounded below by ``reference`` (maximizing).

    Exact, by slicing along the first objective (fine for the fronts of a run: tens of points,
    a few objectives)."""
    pts = [tuple(float(v) for v in p) for p in points if all(v > r for v, r in zip(p, reference))]
    if not pts:
        return 0.0
    if len(reference) == 1:
        return max(p[0] for p in pts) - reference[0]
    pts = [pts[i] for i in non_dominated(pts)]
    pts.sort(key=lambda p: p[0], reverse=True)
    volume = 0.0
    for k, p in enumerate(pts):
        lower = pts[k + 1][0] if k + 1 < len(pts) else reference[0]
        if p[0] > lower:  # the slab (lower, p[0]]: the points at least that far along the first axis
            volume += (p[0] - lower) * hypervolume([q[1:] for q in pts[: k + 1]], reference[1:])
    return volume


class Objectives:
    """A run's objectives mode and floors (see the module docstring)."""

    def __init__(self, config: EvolveConfig) -> None:
        self.tasks = list(config.tasks)
        search = config.search
        self.mode = PARETO if search is not None and search.objectives == PARETO else WEIGHTED
        self.constrained = any(t.min is not None for t in self.tasks)
        # The lowest weighted fitness metrics in [0, 1] can give: infeasible ones are told below it.
        self.floor = -sum(abs(t.weight) for t in self.tasks)
        self.names = [t.name for t in self.tasks]

    @property
    def pareto(self) -> bool:
        return self.mode == PARETO

    def values(self, record: Mapping[str, Any]) -> tuple[float, ...]:
        """The objective vector of a train record (FAILED_OBJECTIVE everywhere when it failed)."""
        if record.get("status") != "ok":
            return tuple(FAILED_OBJECTIVE for _ in self.tasks)
        return tuple(float(task_score(dict(record["scores"]), t)) for t in self.tasks)

    @staticmethod
    def violation_of(record: Mapping[str, Any]) -> float:
        """The record's violation (0 for a run without floors)."""
        return float(record.get("violation") or 0.0)

    def feasible(self, record: Mapping[str, Any]) -> bool:
        """Successful and above every floor."""
        return record.get("status") == "ok" and self.violation_of(record) == 0.0

    def told(self, record: Mapping[str, Any]) -> Any:
        """What the strategy is told about a train record (a float, or a :class:`Told`)."""
        if self.pareto:
            failed = record.get("status") != "ok"
            viol = len(self.tasks) + 1.0 if failed else self.violation_of(record)
            return Told(self.values(record), viol, failed)
        fitness = float(record["fitness"])
        viol = self.violation_of(record) if record.get("status") == "ok" else 0.0
        return fitness if viol == 0.0 else self.floor - viol / (1.0 + viol)

    @staticmethod
    def rank_key(record: Mapping[str, Any]) -> tuple[bool, float, float]:
        """Larger is better: feasible first, then less violation, then weighted fitness
        (:func:`evolve.storage.candidate_rank`, which the reports use too)."""
        from evolve.storage import candidate_rank

        return candidate_rank(dict(record))

    def front(self, records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """The non-dominated feasible train records scored on every document (cache hits and
        copies of one recipe or of one score vector once: the first asked), in ask order (so that
        a resumed run, whose ledger lines arrive in another order, has the same front)."""
        seen: set[str] = set()
        pool = []
        for rec in sorted(records, key=lambda r: r.get("seq", 0)):
            if rec.get("kind", "train") != "train" or rec.get("cached_from") is not None:
                continue
            if not self.feasible(rec) or stopped_early(rec) or rec["recipe_hash"] in seen:
                continue
            seen.add(rec["recipe_hash"])
            pool.append(rec)
        points = [self.values(r) for r in pool]
        return [pool[i] for i in sorted(non_dominated(points))]

    def update_front(self, front: Sequence[Mapping[str, Any]], record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        """``front`` (a :meth:`front` result) with one more record, as :meth:`front` of all of
        them would give it, in O(len(front)): the live search keeps its front this way."""
        if not self.front([record]):
            return list(front)
        value = self.values(record)
        out = []
        for member in front:
            other = self.values(member)
            if member["recipe_hash"] == record["recipe_hash"] or other == value:
                if member.get("seq", 0) <= record.get("seq", 0):
                    return list(front)  # the first asked stays
                continue  # replaced by the earlier one
            if dominates(other, value):
                return list(front)
            if not dominates(value, other):
                out.append(member)
        out.append(record)
        return sorted(out, key=lambda r: r.get("seq", 0))

    def reference_point(self) -> tuple[float, ...]:
        """The hypervolume's reference: 0 on every metric (or its floor, where one is set)."""
        return tuple(float(t.min) if t.min is not None else 0.0 for t in self.tasks)
