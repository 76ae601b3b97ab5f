"""The search's state as a function of its events: asks, results, tells.

A :class:`Trajectory` holds the strategy and everything derived from the ledger's event order:
which candidates were asked (and in which ask call), which results arrived, when the strategy
was told what, the incumbent and the held-out queue.  The live loop (:mod:`.driver`) and the
replay of a stored ledger feed it the same events through the same methods, so a resumed run
is in exactly the state the killed one was in.  Nothing here touches files or workers.

Two schedules:

- ``sync`` (generation barrier, mergekit-evolve's): generation g+1 is asked (one ask call of
  ``popsize``) only after generation g is told, and a generation is told in ask order once all
  its results are in: the trajectory never depends on timing.  Candidate ids ``g{g:05d}-{i:04d}``.
- ``async`` (steady state, the default): a freed worker gets a new candidate at once (one ask of
  one point); results are told in arrival order, ``popsize`` at a time, as soon as a batch is
  full and a point was asked since the previous tell (pycma refuses two tells without an ask;
  at the end of the budget a last, never-told batch may remain: it still counts for the
  incumbent).  Candidate ids ``c{n:06d}``.

A result's ``generation``/``index`` are the tell batch it belongs to and its place in it (for
``sync`` the ask generation and index).  The incumbent is updated when a batch is told (its
best, ties broken by position), and once more for untold results when the run ends.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from evolve.genome import Genome, recipe_hash
from evolve.protocols import HELD_OUT
from evolve.racing import stopped_early
from evolve.search.objectives import Objectives

__all__ = ["ASYNC", "SCHEDULES", "SYNC", "Candidate", "Strategy", "Trajectory", "TrajectoryError"]

SYNC, ASYNC = "sync", "async"
SCHEDULES = (SYNC, ASYNC)
# A replayed point may differ from the recorded one by float noise when a run is resumed on
# another machine (another BLAS): then the recorded point is used; a larger gap is a foreign ledger.
REPLAY_TOLERANCE = 1e-9


class TrajectoryError(ValueError):
    """A ledger that does not replay on this search (other settings, or edited by hand)."""


class Strategy(Protocol):
    """What the trajectory needs of an optimizer (:mod:`evolve.search.strategies` has them).

    A strategy's state must follow from its construction and its ask/tell calls alone (no
    clock, no global RNG): that is what replaying the ledger relies on.
    """

    @property
    def popsize(self) -> int:
        """How many results make one tell (sync: one generation)."""

    def ask(self, number: int) -> list[np.ndarray]:
        """``number`` new points."""

    def tell(self, points: Sequence[np.ndarray], fitness: Sequence[Any]) -> None:
        """Update with evaluated points: what :meth:`evolve.search.objectives.Objectives.told`
        gives (a fitness, higher is better; a multi-objective strategy gets ``Told`` values)."""

    @property
    def sigma(self) -> float:
        """The current step size (for logs)."""

    def stop(self) -> dict[str, Any]:
        """Termination criteria that hold now (empty: go on)."""


@dataclass
class Candidate:
    """One asked point: its id, ask call, sequence number, vector, recipe and hash."""

    eval_id: str
    call: int
    seq: int
    point: np.ndarray
    recipe: dict[str, Any]
    recipe_hash: str
    generation: int | None = None  # sync: the ask generation
    index: int | None = None  # sync: its index in that generation


@dataclass
class _Batch:
    """Results waiting for their tell (async: in arrival order; sync: one generation)."""

    ids: list[str] = field(default_factory=list)


class Trajectory:
    """The search state built from events (see the module docstring)."""

    def __init__(self, strategy: Strategy, genome: Genome, *, schedule: str, max_fevals: int,
                 held_out: bool, objectives: Objectives | None = None) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r} (expected one of {', '.join(SCHEDULES)})")
        self.strategy = strategy
        self.genome = genome
        self.objectives = objectives  # None: the plain weighted fitness, no floors
        self.front: list[dict[str, Any]] = []  # objectives.pareto: the results' Pareto front (Objectives.front)
        self.schedule = schedule
        self.max_fevals = max_fevals
        self.held_out = held_out
        self.candidates: dict[str, Candidate] = {}  # asked, by id, in ask order
        self.results: dict[str, dict[str, Any]] = {}  # train records, by id
        self.first_by_hash: dict[str, str] = {}  # recipe hash -> id of the candidate evaluated for it
        self.calls = 0  # ask calls made
        self.tells = 0
        self.asked_since_tell = False
        self.pending = _Batch()  # results not told yet
        self.generations: dict[int, list[str]] = {}  # sync: ids of each asked generation
        self.best_id: str | None = None
        self.last_told: list[str] = []  # the latest tell's ids (racing's selection cut)
        self.heldout_queue: deque[str] = deque()
        self.heldout_done: set[str] = set()
        self.stop_reason: str | None = None

    @property
    def popsize(self) -> int:
        """The strategy's population size now (a restart strategy may grow it)."""
        return int(self.strategy.popsize)

    # -- asking -----------------------------------------------------------------------------

    def can_ask(self) -> bool:
        """Whether a new ask is allowed now: budget left, not stopped, (sync) no open generation."""
        if self.stop_reason is not None:
            return False
        if self.schedule == SYNC:
            open_gen = any(g >= self.tells for g in self.generations)
            return not open_gen and len(self.candidates) < self.max_fevals
        return len(self.candidates) < self.max_fevals

    def exhausted(self) -> bool:
        """Whether no ask will ever be allowed again (budget spent or the strategy stopped),
        as opposed to sync's barrier, which lifts at the next tell."""
        if self.stop_reason is not None:
            return True
        if self.schedule == SYNC:
            return len(self.candidates) >= self.max_fevals
        return len(self.candidates) >= self.max_fevals

    def ask(self, expected: Sequence[Sequence[float] | None] | None = None) -> list[Candidate]:
        """One ask call (sync: a generation; async: one point).  ``expected``: the points the
        ledger recorded for this call (replay; None where a point has no record): the asked ones
        must match them."""
        number = self.popsize if self.schedule == SYNC else 1
        if expected is not None and len(expected) != number:
            raise TrajectoryError(f"ask call {self.calls} recorded {len(expected)} points, expected {number}")
        points = self.strategy.ask(number)
        call = self.calls
        self.calls += 1
        self.asked_since_tell = True
        out = []
        gen = len(self.generations)  # sync: this call's generation
        for i, point in enumerate(points):
            if expected is not None and expected[i] is not None:
                point = self._check_replayed(point, expected[i], call)
            seq = len(self.candidates)
            if self.schedule == SYNC:
                cand_id, generation, index = f"g{gen:05d}-{i:04d}", gen, i
                self.generations.setdefault(gen, []).append(cand_id)
            else:
                cand_id, generation, index = f"c{seq:06d}", None, None
            recipe = self.genome.decode(point)
            cand = Candidate(cand_id, call, seq, point, recipe, recipe_hash(recipe), generation, index)
            self.candidates[cand_id] = cand
            out.append(cand)
        return out

    @staticmethod
    def _check_replayed(point: np.ndarray, recorded: Sequence[float], call: int) -> np.ndarray:
        want = np.asarray(recorded, dtype=np.float64)
        if np.array_equal(point, want):
            return point
        gap = float(np.max(np.abs(point - want))) if point.shape == want.shape else float("inf")
        if gap > REPLAY_TOLERANCE * max(1.0, float(np.max(np.abs(want)))):
            raise TrajectoryError(f"ask call {call} re-asked on replay differs from the ledger by {gap:.3g}: "
                                  "the ledger does not belong to this search's settings")
        return want  # float noise of another machine: continue from what was recorded

    def source_of(self, cand: Candidate) -> str:
        """The id whose result ``cand`` takes: itself when its recipe is new (then registered)."""
        return self.first_by_hash.setdefault(cand.recipe_hash, cand.eval_id)

    # -- results and tells -----------------------------------------------------------------

    def position(self, cand: Candidate) -> tuple[int, int]:
        """(generation, index) a result of ``cand`` arriving now gets (see the module docstring)."""
        if self.schedule == SYNC:
            assert cand.generation is not None and cand.index is not None
            return cand.generation, cand.index
        pending = len(self.pending.ids)
        return self.tells + pending // self.popsize, pending % self.popsize

    def observe(self, record: dict[str, Any]) -> list[str] | None:
        """Take a train result (ledger order); the ids told when this completed a tell, else None."""
        eval_id = record["eval_id"]
        if eval_id not in self.candidates:
            raise TrajectoryError(f"result {eval_id} has no ask before it")
        if eval_id in self.results:
            raise TrajectoryError(f"result {eval_id} appears twice")
        self.results[eval_id] = record
        if self.objectives is not None and self.objectives.pareto:
            self.front = self.objectives.update_front(self.front, record)
        self.pending.ids.append(eval_id)
        if self.schedule == SYNC:
            gen = self.generations.get(self.tells, [])
            if gen and all(i in self.results for i in gen):
                return self._tell(list(gen))
            return None
        if len(self.pending.ids) >= self.popsize and self.asked_since_tell:
            return self._tell(self.pending.ids[: self.popsize])
        return None

    def _tell(self, ids: list[str]) -> list[str]:
        points = [self.candidates[i].point for i in ids]
        obj = self.objectives
        self.strategy.tell(points, [obj.told(self.results[i]) if obj is not None else float(self.results[i]["fitness"])
                                    for i in ids])
        self.last_told = list(ids)
        self.tells += 1
        self.asked_since_tell = False
        told = set(ids)
        self.pending.ids = [i for i in self.pending.ids if i not in told]
        stop = self.strategy.stop()
        if stop:
            self.stop_reason = f"cma stop: {stop}"
        return ids

    # -- the incumbent ---------------------------------------------------------------------

    def consider(self, ids: Sequence[str]) -> bool:
        """Update the incumbent from told (or, at the end, untold) results; True if it improved.

        A new incumbent is queued for held-out scoring unless it was scored already.
        """
        # A raced candidate stopped early has only an estimate: it cannot be the incumbent (and
        # could not: it stopped below the cut, which is below the incumbent).
        ok = [self.results[i] for i in ids if self.results[i]["status"] == "ok"
              and not stopped_early(self.results[i])]
        if not ok:
            return False
        # With floors: feasible first, then the least violation (Objectives.rank_key).
        rank = self.objectives.rank_key if self.objectives is not None else (lambda r: (r["fitness"],))
        best = max(ok, key=lambda r: (*rank(r), -r["index"]))
        if self.best_id is not None and rank(best) <= rank(self.results[self.best_id]):
            return False
        self.best_id = best["eval_id"]
        self.queue_held_out(self.best_id)
        return True

    def queue_held_out(self, train_id: str) -> None:
        """Queue ``train_id`` for held-out scoring unless it was scored or queued already."""
        if self.held_out and train_id not in self.heldout_done and train_id not in self.heldout_queue:
            self.heldout_queue.append(train_id)

    def front_ids(self) -> list[str]:
        """The ids of the Pareto front of the results so far (:meth:`Objectives.front`)."""
        return [r["eval_id"] for r in self.front]

    def held_out_scored(self, train_id: str) -> None:
        """A held-out result for ``train_id`` is in the ledger."""
        self.heldout_done.add(train_id)
        if train_id in self.heldout_queue:
            self.heldout_queue.remove(train_id)

    @staticmethod
    def held_out_id(train_id: str) -> str:
        """The ledger id of ``train_id``'s held-out scoring."""
        return f"{train_id}/{HELD_OUT}"

    def selection_cut(self) -> float | None:
        """The fitness a candidate must reach to be among the best half of the latest tell (the
        level racing stops candidates below); None before the first tell."""
        if not self.last_told:
            return None
        fits = sorted((float(self.results[i]["fitness"]) for i in self.last_told), reverse=True)
        return fits[max(len(fits) // 2 - 1, 0)]

    def untold(self) -> list[str]:
        """Results that arrived but were never told (the end of an async budget)."""
        return list(self.pending.ids)
