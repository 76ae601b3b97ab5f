"""What a search reports when it ends (the ledger has every detail)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["SearchOutcome"]


@dataclass
class SearchOutcome:
    """Summary of a finished search (the ledger has every detail)."""

    best: dict[str, Any] | None  # ledger record of the best train candidate
    best_recipe: dict[str, Any] | None
    best_held_out: dict[str, Any] | None  # its held-out ledger record, when held_out tasks exist
    generations: int  # tells
    candidates: int  # train results (evaluated or cache hits)
    evaluations: int  # train evaluations actually run (cache hits excluded), all sessions
    held_out_evaluations: int
    stop_reason: str
    busy_fraction: float  # this session: busy worker-seconds / (workers x wall seconds)
