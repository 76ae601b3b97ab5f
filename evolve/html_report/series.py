"""The numbers behind the report's run-over-time figures, from ledger records (no plotting here).

- :func:`fitness_trace`: every train evaluation in the order recorded, the best so far, the
  held-out re-scorings (placed at the evaluation they re-score).
- :func:`batch_spread`: per tell batch, how spread out the population's genomes are, how far
  its mean moved from the start, and its fitness.
- :func:`worker_timeline`: which worker ran what, when; long pauses (between sessions) cut out.
- :func:`failure_table`: failures grouped by reason.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from evolve.baselines import BASELINE
from evolve.protocols import HELD_OUT, TRAIN
from evolve.racing import stopped_early

__all__ = [
    "Bar",
    "BatchStat",
    "FailureRow",
    "FitnessTrace",
    "Timeline",
    "TracePoint",
    "batch_spread",
    "failure_table",
    "fitness_trace",
    "worker_timeline",
]


@dataclass(frozen=True)
class TracePoint:
    """One train record on the fitness trace: its number (1-based, recording order)."""

    n: int
    eval_id: str
    fitness: float
    status: str  # "ok" or "failed"
    cached: bool  # a cache hit (the recipe was evaluated before)
    estimate: bool  # raced and stopped early: the fitness is an estimate
    design: bool = False  # among the first ``initial_design`` asked: the search's start design


@dataclass
class FitnessTrace:
    """:func:`fitness_trace`'s result."""

    points: list[TracePoint] = field(default_factory=list)
    best: list[tuple[int, float]] = field(default_factory=list)  # (n, best fitness so far) at each ok point
    held_out: list[tuple[int, float, str]] = field(default_factory=list)  # (n of its train record, fitness, id)


def fitness_trace(records: Sequence[dict[str, Any]], design: int = 0) -> FitnessTrace:
    """The fitness of every train record in ledger order, the best so far (over successful,
    fully scored ones) and the successful held-out scores at the number of what they re-score.
    ``design``: the run's ``initial_design`` (its manifest's): records of the first that many
    asked (by ``seq``) are marked as the start design's (:mod:`evolve.search.design`)."""
    trace = FitnessTrace()
    number: dict[str, int] = {}
    best: float | None = None
    for rec in records:
        if rec.get("kind") != TRAIN:
            continue
        n = len(trace.points) + 1
        number[rec["eval_id"]] = n
        seq = rec.get("seq")
        point = TracePoint(n, rec["eval_id"], float(rec["fitness"]), rec["status"],
                           rec.get("cached_from") is not None, stopped_early(rec),
                           isinstance(seq, int) and seq < design)
        trace.points.append(point)
        if point.status == "ok" and not point.estimate and (best is None or point.fitness > best):
            best = point.fitness
        if best is not None:
            trace.best.append((n, best))
    for rec in records:
        if rec.get("kind") == HELD_OUT and rec.get("status") == "ok" and rec.get("of") in number:
            trace.held_out.append((number[rec["of"]], float(rec["fitness"]), rec["eval_id"]))
    return trace


@dataclass(frozen=True)
class BatchStat:
    """One tell batch: its size, genome spread (RMS over genes of the standard deviation across
    the batch, overall and per gene name), the RMS distance of its mean from the start, and the
    best / median / worst fitness of its successful members (None when none succeeded)."""

    batch: int
    size: int
    spread: float
    spread_by_gene: dict[str, float]
    drift: float | None
    best: float | None
    median: float | None
    worst: float | None


def _rms(values: Sequence[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values)) if values else 0.0


def batch_spread(records: Sequence[dict[str, Any]], genes: Sequence[str] = ("gene",),
                 x0: Sequence[float] | None = None) -> list[BatchStat]:
    """Per tell batch (a train record's ``generation``), in batch order (see :class:`BatchStat`).

    ``genes``: the genes' kinds (position i of a vector is gene ``genes[i % len(genes)]``: one
    kind per position, or a repeating pattern); ``x0``: the search's starting point (None: no
    drift).
    """
    import numpy as np

    batches: dict[int, list[dict[str, Any]]] = {}
    for rec in records:
        if rec.get("kind") == TRAIN and rec.get("x") is not None:
            batches.setdefault(int(rec["generation"]), []).append(rec)
    out = []
    for batch in sorted(batches):
        members = batches[batch]
        xs = np.asarray([r["x"] for r in members], dtype=np.float64)  # one vectorised pass per batch
        dim = xs.shape[1]
        stds = xs.std(axis=0).tolist()
        by_gene = {g: _rms([s for i, s in enumerate(stds) if genes[i % len(genes)] == g]) for g in dict.fromkeys(genes)}
        mean = xs.mean(axis=0).tolist()
        drift = _rms([m - float(s) for m, s in zip(mean, x0)]) if x0 is not None and len(x0) == dim else None
        fit = sorted(float(r["fitness"]) for r in members if r["status"] == "ok")
        out.append(BatchStat(batch, len(members), _rms(stds), by_gene, drift, fit[-1] if fit else None,
                             statistics.median(fit) if fit else None, fit[0] if fit else None))
    return out


@dataclass(frozen=True)
class Bar:
    """One job on the worker timeline, in seconds on the (gap-cut) axis."""

    row: int
    start: float
    end: float
    kind: str  # "train", "held_out" or "baseline"
    status: str
    eval_id: str


@dataclass
class Timeline:
    """:func:`worker_timeline`'s result: ``rows`` are worker labels; ``breaks`` are (axis
    position, real seconds cut out) of pauses removed from the axis; ``busy`` per row is its
    busy seconds over the axis' length; ``t0`` the unix time of axis position 0."""

    rows: list[str] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    breaks: list[tuple[float, float]] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)
    t0: float = 0.0
    length: float = 0.0


def _duration(timings: dict[str, Any]) -> float | None:
    for key in ("run", "wall_s"):
        value = timings.get(key)
        if isinstance(value, (int, float)) and value >= 0:
            return float(value)
    parts = [timings.get(k) for k in ("merge", "eval")]
    total = sum(float(v) for v in parts if isinstance(v, (int, float)))
    return total if total > 0 else None


def worker_timeline(records: Sequence[dict[str, Any]], *, min_gap_s: float = 300.0,
                    gap_width_s: float | None = None) -> Timeline:
    """Every job a worker ran (train evaluations, held-out re-scorings, baselines), as bars from
    ``done_unix - run`` to ``done_unix`` on one row per worker (``worker@node`` when several
    nodes ran jobs).  Pauses with no job running longer than ``max(min_gap_s, 20 x the median
    job)`` (a run stopped and resumed later) are cut to ``gap_width_s`` (default: 2 median jobs)
    and listed in ``breaks``."""
    jobs = []
    for rec in records:
        timings = rec.get("timings") or {}
        done, worker = timings.get("done_unix"), rec.get("worker")
        if rec.get("kind") not in (TRAIN, HELD_OUT, BASELINE) or worker is None or not isinstance(done, (int, float)):
            continue
        length = _duration(timings)
        if length is None:
            continue
        jobs.append((float(done) - length, float(done), rec))
    timeline = Timeline()
    if not jobs:
        return timeline
    jobs.sort(key=lambda j: j[0])
    several = len({j[2].get("node") for j in jobs}) > 1

    def row_name(rec: dict[str, Any]) -> str:
        return f"{rec['worker']}@{str(rec.get('node'))[:8]}" if several else str(rec["worker"])

    def natural(name: str) -> list[Any]:  # worker-2 before worker-10
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]

    names = sorted({row_name(rec) for _, _, rec in jobs}, key=natural)
    label = {name: i for i, name in enumerate(names)}
    median = statistics.median(max(end - start, 1e-3) for start, end, _ in jobs)
    threshold, width = max(min_gap_s, 20 * median), gap_width_s if gap_width_s is not None else 2 * median
    timeline.t0 = jobs[0][0]
    shift, reach = 0.0, jobs[0][0]  # seconds cut so far; the latest end seen
    for start, end, rec in jobs:
        if start - reach > threshold:
            cut = start - reach - width
            timeline.breaks.append((reach - timeline.t0 - shift + width / 2, start - reach))
            shift += cut
        reach = max(reach, end)
        timeline.bars.append(Bar(label[row_name(rec)], start - timeline.t0 - shift, end - timeline.t0 - shift,
                                 rec["kind"], rec.get("status", "ok"), rec["eval_id"]))
    timeline.rows = list(label)
    timeline.length = max(b.end for b in timeline.bars)
    busy = [0.0] * len(label)
    for bar in timeline.bars:
        busy[bar.row] += bar.end - bar.start
    timeline.busy = [min(b / timeline.length, 1.0) if timeline.length > 0 else 0.0 for b in busy]
    return timeline


@dataclass(frozen=True)
class FailureRow:
    """Failures that share one reason: how many, of which kinds, the first few ids."""

    reason: str
    count: int
    kinds: tuple[str, ...]
    examples: tuple[str, ...]


def failure_table(records: Sequence[dict[str, Any]], examples: int = 3) -> list[FailureRow]:
    """Failed evaluations (train, held-out, baselines; cache hits not counted twice) grouped by
    reason, the most frequent first."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        if rec.get("kind") in (TRAIN, HELD_OUT, BASELINE) and rec.get("status") == "failed" \
                and rec.get("cached_from") is None:
            groups.setdefault(rec.get("reason") or "(no reason given)", []).append(rec)
    rows = [FailureRow(reason, len(recs), tuple(dict.fromkeys(r["kind"] for r in recs)),
                       tuple(r["eval_id"] for r in recs[:examples])) for reason, recs in groups.items()]
    return sorted(rows, key=lambda r: (-r.count, r.reason))
