"""Fitness from task scores, as mergekit-evolve computes it, and the penalty of a failure.

Fitness (maximised) = sum over ``tasks`` of ``weight * scores[name][metric]``: the plain
weighted sum, not divided by the total weight.  A failed candidate gets the penalty.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from evolve.config import TaskConfig

__all__ = ["default_penalty", "is_finite_number", "json_scores", "task_score", "weighted_fitness"]


def default_penalty(tasks: Sequence[TaskConfig]) -> float:
    """Below any fitness reachable with metrics in [0, 1]: -(sum of |weights|) - 1."""
    return -sum(abs(t.weight) for t in tasks) - 1.0


def task_score(scores: dict[str, Any], task: TaskConfig) -> Any:
    """A task's metric value from either score shape pools may report.

    Nested ``{name: {metric: value}}`` (lm-eval's ``results``), or flat ``{name: value}`` /
    ``{"name:metric": value}`` (:class:`evolve.evaluation.EvalResult`'s ``scores``).
    """
    value = scores.get(task.name)
    if isinstance(value, dict):
        return value.get(task.metric)
    flat = scores.get(f"{task.name}:{task.metric}")
    return flat if flat is not None else value


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def weighted_fitness(tasks: Sequence[TaskConfig], scores: dict[str, Any]) -> float:
    """sum(weight * score); raises ValueError naming a missing or non-finite score."""
    total = 0.0
    for task in tasks:
        value = task_score(scores, task)
        if not is_finite_number(value):
            raise ValueError(f"no finite score for task {task.name!r} metric {task.metric!r} (got {value!r})")
        total += task.weight * float(value)
    return total


def json_scores(scores: dict[str, Any]) -> dict[str, Any]:
    """The finite numbers of a score dict (either shape), as ledger-safe JSON."""
    out: dict[str, Any] = {}
    for key, value in scores.items():
        if isinstance(value, dict):
            out[str(key)] = {str(m): float(v) for m, v in value.items() if is_finite_number(v)}
        elif is_finite_number(value):
            out[str(key)] = float(value)
    return out
