"""What observers read off the ledger records a resumed run starts with."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from evolve.protocols import TRAIN

__all__ = ["best_train_fitness", "train_count"]


def best_train_fitness(records: Iterable[dict[str, Any]]) -> float | None:
    """The highest fitness of a successful train evaluation, or None when there is none."""
    ok = [r["fitness"] for r in records if r.get("kind") == TRAIN and r["status"] == "ok"]
    return max(ok) if ok else None


def train_count(records: Iterable[dict[str, Any]]) -> int:
    """The number of train records (evaluated or cache hits)."""
    return sum(1 for r in records if r.get("kind") == TRAIN)
