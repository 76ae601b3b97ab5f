"""Telling a broken setup from unlucky candidates: stop when a run's first candidates all fail alike.

A candidate can fail on its own (non-finite weights, a recipe no method accepts) or for a
passing reason (out of memory, a dead or hung worker); neither says anything about the next
one.  But when the first candidates of a run, all different, fail with one and the same
deterministic reason (a metric no task reports, a task that cannot load), every later one
would too: the budget is better not spent.
"""

from __future__ import annotations

from typing import Any

from merge_core.errors import MergeError

__all__ = ["TRANSIENT_FAILURES", "FailureWatch", "SystematicFailure", "is_transient"]

# Failure reasons that depend on the moment, not on the candidate or the setup.
TRANSIENT_FAILURES = ("out of memory", "outofmemory", "worker died", "timed out", "killed", "connection")


class SystematicFailure(MergeError):
    """The first candidates of a run all failed for one reason: the setup, not the search, is
    at fault (one line; the CLI exits 2)."""


def is_transient(reason: str | None) -> bool:
    """Whether a failure reason names a passing condition (OOM, a dead or hung worker)."""
    text = (reason or "").lower().replace(" ", "")
    return any(marker.replace(" ", "") in text for marker in TRANSIENT_FAILURES)


class FailureWatch:
    """Watches a run's train results until the first success (see the module docstring).

    ``needed``: how many failures with one reason make it systematic; ``active`` False when the
    run already had a success (a resumed run).  ``where`` names the ledger in the message.
    """

    def __init__(self, needed: int, *, active: bool, where: str) -> None:
        self.needed = max(1, needed)
        self.active = active
        self.where = where
        self.reasons: list[str] = []

    def observe(self, record: dict[str, Any]) -> None:
        """Take one evaluated train record; raise SystematicFailure when the rule is met."""
        if not self.active:
            return
        if record["status"] == "ok":
            self.active = False
            return
        self.reasons.append(record.get("reason") or "")
        distinct = set(self.reasons)
        if len(self.reasons) >= self.needed and len(distinct) == 1:
            (reason,) = distinct
            if not is_transient(reason):
                raise SystematicFailure(
                    f"stopped: the first {len(self.reasons)} candidates all failed with: {reason} "
                    f"(see {self.where}; fix the cause and run the same command again)")
