"""What a multi-objective run sends to W&B beside the usual metrics (:mod:`.wandb_logger`):
after each evaluation the front's hypervolume (``pareto/hypervolume``) and size
(``pareto/front_size``), and with each tell the front as a table (``pareto/front``: id, weighted
fitness and one column per objective)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from evolve.search.objectives import Objectives, hypervolume

__all__ = ["ParetoLog"]


class ParetoLog:
    """The front of the train records seen so far (resumed runs: from the ledger at start)."""

    def __init__(self, objectives: Objectives, records: Iterable[Mapping[str, Any]] = ()) -> None:
        self.objectives = objectives
        self.front = objectives.front(r for r in records if r.get("kind") == "train")

    @classmethod
    def for_driver(cls, driver: Any) -> ParetoLog | None:
        """The log of a driver's run, None unless it is multi-objective."""
        objectives = getattr(driver, "objectives", None)
        if objectives is None or not objectives.pareto:
            return None
        return cls(objectives, driver.records.values())

    def observe(self, record: Mapping[str, Any]) -> dict[str, float]:
        """Take a train record; the metrics to log with it."""
        self.front = self.objectives.update_front(self.front, record)
        points = [self.objectives.values(r) for r in self.front]
        return {"pareto/hypervolume": hypervolume(points, self.objectives.reference_point()),
                "pareto/front_size": float(len(self.front))}

    def table(self) -> tuple[list[str], list[list[Any]]]:
        """(columns, rows) of the front now."""
        columns = ["eval_id", "fitness", *self.objectives.names]
        return columns, [[r["eval_id"], r["fitness"], *self.objectives.values(r)] for r in self.front]
