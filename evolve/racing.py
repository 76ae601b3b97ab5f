"""Racing: score a candidate on growing subsets of the documents, stop it once it cannot win.

Every candidate sees each task's documents in one fixed, seeded order (:func:`doc_order`), so
two candidates' first n documents are the same n documents and their results can be compared
document by document.  A raced candidate is scored chunk by chunk (by default the first 1/8,
1/4, 1/2 of the documents, then all).  After each chunk its weighted fitness is estimated
*paired* against a reference candidate scored on every document (the incumbent): per task,
``estimate = reference's full mean + mean over the seen documents of (candidate - reference)``,
with a standard error from those differences (a pseudo-count keeps it from being 0 after a few
identical documents) and the finite-population correction.  When the upper confidence bound
(``estimate + z * se``) cannot reach the level the candidate must beat (the current
population's selection cut), it stops and is told with its estimate; otherwise it goes on, and a
candidate that passes every check is scored on all documents like any other.

Only leaf tasks whose metric is a plain mean over documents can be raced (``acc``,
``exact_match``...); with any other (a group, a corpus-level metric) a run evaluates every
candidate on every document.  Per-document values travel as compact strings
(:func:`encode_values`): 1 bit per document when they are 0/1.
"""

from __future__ import annotations

import base64
import math
import random
import struct
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "DEFAULT_FRACTIONS",
    "DEFAULT_Z",
    "LEGACY_Z",
    "Bound",
    "RaceJob",
    "chunk_ends",
    "decode_values",
    "doc_order",
    "encode_values",
    "fitness_interval",
    "paired_bound",
    "pareto_stop",
    "stopped_early",
]

DEFAULT_FRACTIONS = (0.125, 0.25, 0.5)
# One-sided ~16% per check of stopping a candidate that would have reached the level.  A stopped
# candidate is told with its estimate, so a wrong stop costs little: on the toy zoo (bench_search.py,
# 5 seeds) z 1.0 scored 0.46 of the documents for the full-scoring median, z 2.0 0.64, z 1.5 0.54.
DEFAULT_Z = 1.0
# Runs stored before the confidence was recorded in their manifest raced at this (the old default).
LEGACY_Z = 2.0


def stopped_early(record: Mapping[str, Any]) -> bool:
    """Whether a ledger record is a raced candidate stopped before its last document: its fitness
    is an estimate (it never becomes the incumbent and the reports do not rank it)."""
    race = record.get("race")
    return isinstance(race, dict) and bool(race.get("stopped"))


@dataclass(frozen=True)
class RaceJob:
    """What a worker needs to race one candidate (sent with the job, plain data for Ray).

    ``threshold``: the fitness the candidate must be able to reach; ``reference``: per task, the
    reference candidate's value on each document in race order; ``reference_scores``: its full
    per-task scores; ``weights``: each task's weight; ``fractions``: where the checks are.
    """

    threshold: float
    reference_id: str
    reference: Mapping[str, Sequence[float]]
    reference_scores: Mapping[str, float]
    weights: Mapping[str, float]
    z: float = DEFAULT_Z
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    # Several objectives (search.objectives: pareto) and floors: the front members' per-task
    # scores (id -> task -> score) and each floored task's minimum; see :func:`pareto_stop`.
    front: Mapping[str, Mapping[str, float]] | None = None
    floors: Mapping[str, float] | None = None


@dataclass(frozen=True)
class Bound:
    """A paired estimate of a candidate's fitness: the estimate, its interval, per-task scores."""

    estimate: float
    low: float
    high: float
    scores: dict[str, float]
    highs: dict[str, float] | None = None  # per task: the upper bound of its score


def doc_order(n: int, seed: int, task: str) -> list[int]:
    """A seeded permutation of ``range(n)``, the same for every candidate (and worker) of a run."""
    rng = random.Random(f"{seed}:{task}")
    order = list(range(n))
    rng.shuffle(order)
    return order


def chunk_ends(n: int, fractions: Sequence[float]) -> list[int]:
    """How many documents (of ``n``) are seen at each check, ending with all ``n``."""
    ends = sorted({max(1, min(n, math.ceil(f * n))) for f in fractions if 0 < f < 1})
    return [e for e in ends if e < n] + [n]


def paired_bound(candidate: Mapping[str, Sequence[float]], job: RaceJob, z: float | None = None) -> Bound:
    """The paired estimate and interval of the candidate's fitness after its first documents.

    ``candidate``: per task, its values on the first documents in race order (each a prefix of
    the reference's documents).
    """
    z = job.z if z is None else z
    estimate, variance, scores, highs = 0.0, 0.0, {}, {}
    for task, weight in job.weights.items():
        seen = np.asarray(candidate[task], dtype=np.float64)
        ref = np.asarray(job.reference[task], dtype=np.float64)
        n, total = len(seen), len(ref)
        diff = seen - ref[:n]
        mean_diff = float(diff.mean()) if n else 0.0
        # Second moment with one pseudo-document of difference 1: a few equal answers in a row
        # are no proof that the two candidates agree everywhere.
        second = (float(np.sum(diff ** 2)) + 1.0) / (n + 1)
        spread = max(second - mean_diff ** 2, 0.0)
        fpc = (total - n) / (total - 1) if total > 1 else 0.0
        scores[task] = min(max(job.reference_scores[task] + mean_diff, 0.0), 1.0)
        highs[task] = job.reference_scores[task] + mean_diff + z * math.sqrt(spread / max(n, 1) * fpc)
        estimate += weight * (job.reference_scores[task] + mean_diff)
        variance += weight ** 2 * spread / max(n, 1) * fpc
    half = z * math.sqrt(variance)
    return Bound(estimate, estimate - half, estimate + half, scores, highs)


def pareto_stop(bound: Bound, job: RaceJob) -> dict[str, Any] | None:
    """Why a candidate can stop with several objectives (None: go on): some task's upper bound
    is below its floor (``{"why": "floor", "task": ...}``), or a front member scores above every
    task's upper bound (``{"why": "dominated", "by": id}``); otherwise it is scored in full.  The
    per-task upper bounds come along (``highs``) for the ledger."""
    highs = bound.highs or {}
    for task, floor in (job.floors or {}).items():
        if task in highs and highs[task] < floor:
            return {"why": "floor", "task": task, "highs": highs}
    for member, scores in (job.front or {}).items():
        if highs and all(scores.get(task, -math.inf) > high for task, high in highs.items()):
            return {"why": "dominated", "by": member, "highs": highs}
    return None


def fitness_interval(values: Mapping[str, Sequence[float]], weights: Mapping[str, float],
                     z: float = 1.96) -> tuple[float, float]:
    """A ``z`` confidence interval of a fully scored candidate's weighted fitness (its documents
    as a sample of the tasks' distributions)."""
    center, variance = 0.0, 0.0
    for task, weight in weights.items():
        arr = np.asarray(values[task], dtype=np.float64)
        center += weight * float(arr.mean())
        variance += weight ** 2 * (float(arr.var(ddof=1)) if len(arr) > 1 else 0.0) / max(len(arr), 1)
    half = z * math.sqrt(variance)
    return center - half, center + half


def encode_values(values: Sequence[float]) -> str:
    """Per-document values as a string: ``b:<base64 bits>`` when all are 0/1, else ``f:`` doubles."""
    arr = np.asarray(values, dtype=np.float64)
    if np.all((arr == 0.0) | (arr == 1.0)):
        bits = np.packbits(arr.astype(np.uint8))
        return f"b{len(arr)}:" + base64.b64encode(bits.tobytes()).decode()
    return "f:" + base64.b64encode(struct.pack(f"<{len(arr)}d", *arr)).decode()


def decode_values(text: str) -> list[float]:
    """The inverse of :func:`encode_values`."""
    head, _, body = text.partition(":")
    raw = base64.b64decode(body)
    if head.startswith("b"):
        n = int(head[1:])
        return [float(v) for v in np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:n]]
    return list(struct.unpack(f"<{len(raw) // 8}d", raw))
