"""Rebuilding a search's state from its ledger (what ``resume`` does instead of unpickling).

The ledger holds the events in the order they happened: ``ask`` records (one ask call of the
strategy each, or ``popsize`` records of one call in the sync schedule), results (``train``) and
held-out scorings.  :func:`replay_ledger` feeds them, in order, to a fresh
:class:`~evolve.search.trajectory.Trajectory` built with the run's settings: each ask call is
made again and must give the recorded points, each result is observed (and told when a batch
completes) exactly as the live loop did.  Sync ledgers written before ask records existed
(merge-evolve 0.1) are replayed from their generations: generation g's ask call is made when its
first result appears.
"""

from __future__ import annotations

from typing import Any, Sequence

from evolve.protocols import HELD_OUT, TRAIN
from evolve.search.records import ASK
from evolve.search.trajectory import SYNC, Trajectory, TrajectoryError

__all__ = ["replay_ledger"]


def _ask_again(traj: Trajectory, points: list[Any], ids: Sequence[str] | None) -> None:
    asked = traj.ask(expected=points)
    for cand, recorded in zip(asked, ids or ()):
        if cand.eval_id != recorded:
            raise TrajectoryError(f"ask call {cand.call} named {recorded}, replay names {cand.eval_id}")
    for cand in asked:
        traj.source_of(cand)  # as the live loop registers them, in ask order


def replay_ledger(traj: Trajectory, ledger: Sequence[dict[str, Any]]) -> None:
    """Feed the stored events to ``traj``; TrajectoryError when they do not replay."""
    asks: dict[int, list[dict[str, Any]]] = {}
    legacy: dict[int, dict[int, list[float]]] = {}  # sync ledgers without ask records
    for rec in ledger:
        if rec.get("kind") == ASK:
            asks.setdefault(int(rec["call"]), []).append(rec)
        elif rec.get("kind") == TRAIN and traj.schedule == SYNC:
            legacy.setdefault(int(rec["generation"]), {})[int(rec["index"])] = rec["x"]
    try:
        for rec in ledger:
            kind = rec.get("kind")
            if kind == ASK:
                if int(rec["call"]) == traj.calls:
                    call = asks[traj.calls]
                    _ask_again(traj, [r["x"] for r in call], [r["eval_id"] for r in call])
            elif kind == TRAIN:
                if rec["eval_id"] not in traj.candidates and traj.schedule == SYNC:
                    gen = legacy[len(traj.generations)]
                    _ask_again(traj, [gen.get(i) for i in range(traj.popsize)], None)
                told = traj.observe(rec)
                if told is not None:
                    traj.consider(told)
            elif kind == HELD_OUT:
                traj.held_out_scored(rec["of"])
    except KeyError as exc:
        raise TrajectoryError(f"the ledger misses {exc}") from None
