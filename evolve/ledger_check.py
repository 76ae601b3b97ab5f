"""What the reports may read of a ledger they did not write: whatever it holds, no traceback.

A ledger is written only by the run itself, whole line by whole line; but it is a text file
that people copy, concatenate, edit and truncate.  The reports (``merge-evolve report``, the
HTML report) read it with :func:`readable_records`: records that lack a field the reports read
(or hold one of the wrong type) are left out, a result that appears twice is counted once, and
both are named in problem lines the caller prints as one warning.  ``resume`` is stricter: it
refuses a ledger with a repeated result (the search's state would not replay), and the warning
says so in the same words.
"""

from __future__ import annotations

from typing import Any, Iterable

from evolve.protocols import HELD_OUT, TRAIN

__all__ = ["ledger_warning", "readable_records"]

_NUMBER = (int, float)
# The fields the reports read, per record kind, and their JSON types.
REQUIRED: dict[str, dict[str, tuple[type, ...]]] = {
    "ask": {"eval_id": (str,), "call": (int,), "x": (list,)},
    TRAIN: {"eval_id": (str,), "generation": (int,), "status": (str,), "fitness": _NUMBER, "scores": (dict,)},
    HELD_OUT: {"eval_id": (str,), "of": (str,), "status": (str,), "fitness": _NUMBER, "scores": (dict,)},
    "baseline": {"eval_id": (str,), "name": (str,), "task_set": (str,), "status": (str,), "fitness": _NUMBER,
                 "scores": (dict,)},
}
# Kinds whose eval_id is unique in a well-formed ledger (a baseline may be re-scored: latest wins).
UNIQUE_KINDS = ("ask", TRAIN)
MAX_NAMED = 3  # problems spelled out in the warning; the rest are counted


def _problem(record: dict[str, Any]) -> str | None:
    """Why the reports cannot read ``record``, or None."""
    kind = record.get("kind")
    fields = REQUIRED.get(kind) if isinstance(kind, str) else None
    if fields is None:
        return f"unknown kind {str(kind)[:20]!r}" if "kind" in record else "no 'kind'"
    for name, types in fields.items():
        if name not in record:
            return f"a {kind} record without '{name}'"
        value = record[name]
        if not isinstance(value, types) or isinstance(value, bool):
            return f"a {kind} record whose '{name}' is a {type(value).__name__}"
    if record["kind"] != "ask" and record["status"] not in ("ok", "failed"):
        return f"a {kind} record whose status is {str(record['status'])[:20]!r}"
    return None


def readable_records(records: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """(the records the reports can read, in ledger order; one line per problem found).

    Lines are numbered as in the file (the ledger reader keeps every line but a torn last one).
    """
    kept: list[dict[str, Any]] = []
    problems: list[str] = []
    seen: dict[tuple[str, str], int] = {}
    for line, record in enumerate(records, start=1):
        why = _problem(record)
        if why is not None:
            problems.append(f"line {line}: {why}")
            continue
        if record["kind"] in UNIQUE_KINDS:
            key = (record["kind"], record["eval_id"])
            if key in seen:
                what = "result" if record["kind"] == TRAIN else "ask"
                problems.append(f"line {line}: {what} {record['eval_id']} appears twice (first at line {seen[key]}; "
                                "`resume` refuses this ledger)")
                continue
            seen[key] = line
        kept.append(record)
    return kept, problems


def ledger_warning(problems: list[str]) -> str | None:
    """The one warning line for :func:`readable_records`' problems (None when there are none)."""
    if not problems:
        return None
    named = "; ".join(problems[:MAX_NAMED])
    more = f"; and {len(problems) - MAX_NAMED} more" if len(problems) > MAX_NAMED else ""
    return f"warning: {len(problems)} ledger record(s) not read: {named}{more}"
