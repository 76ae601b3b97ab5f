"""The search strategies, by name (the config's ``search: {strategy: ...}``).

Each implements :class:`evolve.search.trajectory.Strategy` (ask/tell/popsize/sigma/stop) and is
deterministic given its seed and its ask/tell calls, so the ledger's replay rebuilds it:

- ``cmaes``: pycma's CMA-ES in the genome's box (:class:`evolve.search.cmaes.CMAES`).
- ``ipop-cmaes``: CMA-ES restarted with twice the population each time pycma's own stop
  criteria fire before the budget is spent (IPOP; on plateaus of discrete metrics, which make
  plain CMA-ES stop early, it keeps searching).  A restart starts from a seeded uniform point
  of the box; ``sigma`` is the current run's.
- ``tpe``: optuna's Tree-structured Parzen Estimator (multivariate, with the constant liar for
  points still being evaluated), the model-based alternative (optuna, a dependency).  The
  start point is its first trial; ``sigma`` is the spread of the last ``popsize`` points.

``cmaes`` and ``ipop-cmaes`` start with a space-filling design (:mod:`evolve.search.design`)
when ``design_size`` > 0; ``tpe``'s first trials are its own random design, so it takes none.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np

from evolve.config import MO_STRATEGY_NAMES, STRATEGY_NAMES
from evolve.search.cmaes import CMAES
from evolve.search.design import DesignSpace, InitialDesign
from evolve.search.mo_strategies import mo_registry
from evolve.search.pending import OptunaAsks, OptunaStrategyMembers
from merge_core.errors import RecipeError

__all__ = ["DEFAULT_STRATEGY", "DESIGN_STRATEGIES", "STRATEGIES", "IPOPCMAES", "OptunaTPE", "make_strategy"]

MAX_RESTARTS = 8


class IPOPCMAES:
    """CMA-ES with restarts of a doubling population (see the module docstring)."""

    def __init__(self, x0: Sequence[float], sigma0: float, *, bounds: tuple[list[float], list[float]],
                 popsize: int, seed: int, scales: Sequence[float], mirrors: bool = True) -> None:
        self._args = {"sigma0": sigma0, "bounds": bounds, "scales": scales, "mirrors": mirrors}
        self.seed = seed
        self.restarts = 0
        self.inner = CMAES(x0, sigma0, bounds=bounds, popsize=popsize, seed=seed, scales=scales, mirrors=mirrors)

    @property
    def popsize(self) -> int:
        return self.inner.popsize

    @property
    def sigma(self) -> float:
        return self.inner.sigma

    def ask(self, number: int) -> list[np.ndarray]:
        return self.inner.ask(number)

    def tell(self, points: Sequence[np.ndarray], fitness: Sequence[float]) -> None:
        self.inner.tell(points, fitness)

    def stop(self) -> dict[str, Any]:
        """Restart instead of stopping, up to ``MAX_RESTARTS`` times."""
        stop = self.inner.stop()
        if not stop or self.restarts >= MAX_RESTARTS:
            return stop
        self.restarts += 1
        lo, hi = (np.asarray(b, dtype=np.float64) for b in self._args["bounds"])
        x0 = np.random.default_rng([self.seed, self.restarts]).uniform(lo, hi)
        self.inner = CMAES(x0, self._args["sigma0"], bounds=self._args["bounds"], popsize=2 * self.popsize,
                           seed=self.seed + 1000 * self.restarts, scales=self._args["scales"],
                           mirrors=self._args["mirrors"])
        return {}


class OptunaTPE(OptunaStrategyMembers):
    """optuna's TPE behind the ask/tell interface (see the module docstring)."""

    def __init__(self, x0: Sequence[float], sigma0: float, *, bounds: tuple[list[float], list[float]],
                 popsize: int, seed: int, scales: Sequence[float], mirrors: bool = True) -> None:
        try:
            import optuna
        except ImportError:
            raise RecipeError("search.strategy", "tpe needs optuna: pip install 'merge-evolve[optuna]'") from None
        optuna.logging.set_verbosity(logging.WARNING)
        self._optuna = optuna
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                             n_startup_trials=max(popsize, 10))
        self.study = optuna.create_study(direction="maximize", sampler=sampler)
        self.pending = OptunaAsks(self.study, x0, bounds, popsize)  # the start point is the first trial

    def tell(self, points: Sequence[np.ndarray], fitness: Sequence[float]) -> None:
        for point, value in zip(points, fitness):
            trial = self.pending.pop(point)
            self.study.tell(trial, float(value))


# The names are the config's (validated there without importing pycma), in the same order.
STRATEGIES: dict[str, Callable[..., Any]] = dict(zip(STRATEGY_NAMES, (CMAES, IPOPCMAES, OptunaTPE)))
DEFAULT_STRATEGY = "cmaes"


# Strategies that take a space-filling start (a design_size > 0).
DESIGN_STRATEGIES = ("cmaes", "ipop-cmaes")


def make_strategy(name: str, x0: Sequence[float], sigma0: float, *, design_size: int = 0,
                  design_space: DesignSpace | None = None, objectives: int = 0, **kwargs: Any) -> Any:
    """The strategy registered as ``name`` (kwargs: bounds, popsize, seed, scales, mirrors),
    after a design of ``design_size`` points of ``design_space`` (the genome) when > 0; a
    multi-objective one (:mod:`evolve.search.mo_strategies`) for ``objectives`` objectives."""
    if name in MO_STRATEGY_NAMES:
        assert objectives >= 2, "a multi-objective strategy needs the number of objectives"
        return mo_registry(make_strategy)[name](x0, sigma0, objectives=objectives, design_size=design_size,
                                                 design_space=design_space, **kwargs)
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise RecipeError("search.strategy", f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}"
                          ) from None
    if design_size <= 0:
        return cls(x0, sigma0, **kwargs)
    if name not in DESIGN_STRATEGIES:
        raise RecipeError("search.initial_design", f"{name} takes no initial design (its first trials are its own)")
    assert design_space is not None, "a design needs the genome's design space"
    return InitialDesign(x0, size=design_size, popsize=kwargs["popsize"], seed=kwargs["seed"], sigma0=sigma0,
                         design_dimension=design_space.design_dimension, design_point=design_space.design_point,
                         make_inner=lambda start: cls(start, sigma0, **kwargs))
