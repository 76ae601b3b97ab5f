"""What ``merge-evolve`` prints when a search ends, or when it finds its run already complete.

The headline is the run's answer: the best's fitness and its gain over the best parent (the
best input model, :mod:`evolve.baselines`), on the train tasks and on the held-out tasks; then
the counts and where the results are.  A rerun of a complete run says so and how to extend it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from evolve.baselines import baseline_summary, best_parent

__all__ = ["complete_lines", "extended_budget", "outcome_lines"]


def _versus(value: float, parent: dict[str, Any] | None, key: str) -> str:
    if parent is None:
        return f"{value:.4f}"
    return f"{value:.4f}, {value - parent[key]:+.4f} over the best parent ({parent['name']} {parent[key]:.4f})"


def headline(outcome: Any, records: Iterable[dict[str, Any]]) -> str:
    """``best: train 0.6770, +0.1650 over the best parent (format 0.5120); held-out ...``."""
    summary = baseline_summary(records)
    line = "best: train " + _versus(float(outcome.best["fitness"]), best_parent(summary), "fitness")
    if outcome.best_held_out is not None:
        line += "; held-out " + _versus(float(outcome.best_held_out["fitness"]),
                                        best_parent(summary, "held_out_fitness"), "held_out_fitness")
    if not summary:
        line += " (no baselines scored: the gain over the parents is unknown)"
    return line


def _where(storage: Path) -> list[str]:
    lines = [f"best recipe: {storage / 'best_config.yaml'}"]
    if (storage / "report.html").exists():
        lines.append(f"report: {storage / 'report.html'}")
    return lines


def outcome_lines(outcome: Any, storage: Path, records: Iterable[dict[str, Any]]) -> list[str]:
    """The closing summary of a search (``records``: the run's ledger records)."""
    if outcome.best is None:
        return [f"no successful evaluation ({outcome.stop_reason}); see {storage / 'evaluations.jsonl'}"]
    return [headline(outcome, records),
            f"best candidate {outcome.best['eval_id']}; {outcome.evaluations} evaluations, {outcome.generations} "
            f"generations, worker busy fraction {outcome.busy_fraction:.2f}, stopped: {outcome.stop_reason}",
            *_where(storage)]


def extended_budget(candidates: int) -> int:
    """A ``--max-fevals`` to suggest for extending a run of ``candidates``: half as many again."""
    return candidates + max(candidates // 2, 1)


def complete_lines(outcome: Any, storage: Path, records: Iterable[dict[str, Any]], max_fevals: int) -> list[str]:
    """What a rerun of a complete run prints (no worker started): that it is complete, how to
    get more, its result."""
    if outcome.stop_reason.startswith("max_fevals"):
        more = ("to extend it, run the same command with a larger budget, e.g. --max-fevals "
                f"{extended_budget(max(outcome.candidates, max_fevals))}")
    else:  # the optimizer stopped by itself: more budget would not continue it
        more = ("the optimizer stopped by itself, so a larger --max-fevals does not continue it; start a new "
                "--storage-path (e.g. with another --random-seed or a larger --sigma0)")
    lines = [f"run already complete ({outcome.stop_reason}; {outcome.candidates} candidates, {outcome.evaluations} "
             f"evaluations): nothing to do; {more}"]
    if outcome.best is not None:
        lines += [headline(outcome, records) + f" ({outcome.best['eval_id']})", *_where(storage)]
    return lines
