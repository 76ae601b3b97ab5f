"""The race a train candidate runs (:mod:`evolve.racing`), from the search's state now.

The reference is the incumbent (scored on every document): the candidate is paired with its
per-document values.  With one objective, it must be able to reach the incumbent's fitness
(``RaceSettings.level`` "incumbent") or the latest tell's selection cut ("cut"); with floors,
while no candidate met them, no fitness level applies (a feasible one would be the incumbent).  With several
(``search.objectives: pareto``) there is no fitness level: it stops only when a front member
scores above each of its per-task upper bounds.  With floors, it also stops once some task's
upper bound is below its floor (it cannot be feasible).
"""

from __future__ import annotations

from typing import Any, Mapping

from evolve.config import EvolveConfig
from evolve.racing import RaceJob, decode_values
from evolve.search.objectives import Objectives
from evolve.search.trajectory import Trajectory

__all__ = ["race_job"]

Reference = tuple[str, dict[str, list[float]]]


def race_job(racing: Any, traj: Trajectory, records: Mapping[str, dict[str, Any]], config: EvolveConfig,
             objectives: Objectives, cached: Reference | None) -> tuple[RaceJob | None, Reference | None]:
    """(the job, the decoded reference to keep for the next call); job None: no reference yet
    (nothing told, no incumbent scored on every document, or other tasks)."""
    cut = traj.selection_cut()
    if cut is None or traj.best_id is None:
        return None, cached
    best = records[traj.best_id]
    if "per_doc" not in best:
        return None, cached
    if cached is None or cached[0] != best["eval_id"]:
        cached = (best["eval_id"], {t: decode_values(v) for t, v in best["per_doc"].items()})
    weights = {t.name: float(t.weight) for t in config.tasks}
    if set(weights) != set(cached[1]):
        return None, cached
    floors = {t.name: float(t.min) for t in config.tasks if t.min is not None} or None
    front = None
    if objectives.pareto:
        threshold = objectives.floor - 1.0  # below any fitness: only the front and the floors stop it
        front = {r["eval_id"]: {t: float(r["scores"][t]) for t in weights} for r in traj.front
                 if all(isinstance(r["scores"].get(t), (int, float)) for t in weights)}
    elif not objectives.feasible(best):
        # No feasible incumbent yet: any candidate meeting the floors would be the new one, whatever
        # its fitness; only the floors stop it.
        threshold = objectives.floor - 1.0
    else:
        threshold = float(best["fitness"]) if racing.level == "incumbent" else cut
    job = RaceJob(threshold=threshold, reference_id=best["eval_id"], reference=cached[1],
                  reference_scores={t: float(best["scores"][t]) for t in weights}, weights=weights,
                  z=racing.z, fractions=racing.fractions, front=front, floors=floors)
    return job, cached
