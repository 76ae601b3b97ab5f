"""The ledger's records: what each event of a search writes (one JSON object per line).

- ``ask``: a candidate was asked (before it is submitted): id, ask call, sequence number,
  vector and recipe hash.  Replaying these is how a run rebuilds its optimizer.
- ``train``: a candidate's result: scores, fitness, status (and the failure reason), with floors
  ``violation`` (:mod:`evolve.search.objectives`; 0: feasible), worker
  and node, timings, its tell batch and place (``generation``/``index``), or ``cached_from``
  the earlier candidate with the same recipe.  With racing also ``documents``/``documents_full``
  (scored / all), ``race`` (stopped or not, the interval, the threshold, the reference) and,
  when every document was scored, ``per_doc`` (each task's values, :func:`evolve.racing.encode_values`).
- ``held_out``: a held-out re-scoring of an incumbent (``of``: its train id).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from evolve.config import TaskConfig
from evolve.protocols import HELD_OUT, TRAIN, Result
from evolve.racing import encode_values
from evolve.search.fitness import json_scores, weighted_fitness
from evolve.search.objectives import violation
from evolve.search.trajectory import Candidate

__all__ = ["ASK", "ask_record", "cached_record", "held_out_record", "scored", "train_record"]

ASK = "ask"


def ask_record(cand: Candidate) -> dict[str, Any]:
    """The ``ask`` record of a candidate."""
    return {"eval_id": cand.eval_id, "kind": ASK, "call": cand.call, "seq": cand.seq,
            "x": [float(v) for v in cand.point], "recipe_hash": cand.recipe_hash}


def scored(result: Result, tasks: Sequence[TaskConfig], penalty: float, submitted: float | None) -> dict[str, Any]:
    """Status, reason, scores, fitness (the penalty when failed), worker, node and timings of a result."""
    status, reason, fitness = result.status, result.reason, penalty
    if status == "ok":
        try:
            fitness = weighted_fitness(tasks, result.scores)
        except ValueError as exc:
            status, reason = "failed", str(exc)
    elif status != "failed":
        status, reason = "failed", f"unknown result status {result.status!r}: {result.reason}"
    else:
        reason = reason or "evaluation failed (no reason given)"
    timings = {k: float(v) for k, v in result.timings.items() if isinstance(v, (int, float))}
    extra = {}
    if status == "ok" and any(t.min is not None for t in tasks):  # floors: how far below them (0: feasible)
        extra["violation"] = violation(tasks, result.scores)
    if result.note:
        extra["note"] = result.note
    if submitted is not None:
        timings["wall_s"] = time.monotonic() - submitted
    timings["done_unix"] = time.time()  # when the driver got it: throughput, gaps, W&B time axis
    return {"status": status, "reason": reason if status == "failed" else None,
            "scores": json_scores(result.scores or {}), "fitness": float(fitness), "worker": result.worker,
            "node": result.node, "timings": timings, **extra}


def _train_base(cand: Candidate, position: tuple[int, int]) -> dict[str, Any]:
    return {"eval_id": cand.eval_id, "kind": TRAIN, "generation": position[0], "index": position[1],
            "seq": cand.seq, "x": [float(v) for v in cand.point], "recipe_hash": cand.recipe_hash}


def train_record(cand: Candidate, position: tuple[int, int], result: Result, tasks: Sequence[TaskConfig],
                 penalty: float, submitted: float | None) -> dict[str, Any]:
    """The ``train`` record of an evaluated candidate."""
    record = _train_base(cand, position)
    record.update(scored(result, tasks, penalty, submitted))
    record["cached_from"] = None
    if result.documents is not None:  # racing: what was scored, and every value when complete
        record["documents"], record["documents_full"] = result.documents, result.documents_full
        if result.race is not None:
            record["race"] = result.race
        if result.per_doc is not None and record["status"] == "ok":
            record["per_doc"] = {task: encode_values(v) for task, v in result.per_doc.items()}
    return record


def cached_record(cand: Candidate, position: tuple[int, int], source: dict[str, Any]) -> dict[str, Any]:
    """The ``train`` record of a candidate whose recipe was evaluated before (``source``)."""
    record = _train_base(cand, position)
    for key in ("status", "reason", "scores", "fitness"):
        record[key] = source[key]
    if "violation" in source:
        record["violation"] = source["violation"]
    if "race" in source:  # an estimate stays an estimate
        record["race"] = source["race"]
    record.update(cached_from=source["eval_id"], worker=None, node=None, timings={})
    return record


def held_out_record(train: dict[str, Any], result: Result, tasks: Sequence[TaskConfig], penalty: float,
                    submitted: float | None) -> dict[str, Any]:
    """The ``held_out`` record of an incumbent's re-scoring."""
    record = {"eval_id": f"{train['eval_id']}/{HELD_OUT}", "kind": HELD_OUT, "of": train["eval_id"],
              "recipe_hash": train["recipe_hash"]}
    record.update(scored(result, tasks, penalty, submitted))
    return record
