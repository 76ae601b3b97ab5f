"""The search: the driver that runs the ask/evaluate/tell loop, its strategy and its fitness.

- :class:`SearchDriver` (:mod:`.driver`): one run directory's loop, resumable at any instant.
- :class:`CMAES` (:mod:`.cmaes`): the optimizer (pycma), seeded, with savable state.
- :mod:`.strategies`: the strategies by name; :mod:`.design`: CMA-ES's space-filling start;
  :mod:`.mo_strategies`: the multi-objective ones; :mod:`.objectives`: weighted or Pareto, floors.
- :mod:`.fitness`: the weighted fitness of task scores and the penalty of a failure.
- :mod:`.provenance`: package versions and the best candidate's provenance.

Importing this package imports pycma (~1 s); workers import :mod:`evolve.protocols` instead.
"""

from evolve.protocols import HELD_OUT, TRAIN, EvaluationPool, Result, SearchObserver
from evolve.search.cmaes import CMAES
from evolve.search.driver import SearchDriver, default_popsize, eval_id
from evolve.search.fitness import default_penalty, task_score, weighted_fitness
from evolve.search.outcome import SearchOutcome
from evolve.search.provenance import package_versions

__all__ = [
    "CMAES",
    "HELD_OUT",
    "TRAIN",
    "EvaluationPool",
    "Result",
    "SearchDriver",
    "SearchObserver",
    "SearchOutcome",
    "default_penalty",
    "default_popsize",
    "eval_id",
    "package_versions",
    "task_score",
    "weighted_fitness",
]
