"""Multi-objective strategies (``search.objectives: pareto``), behind the same ask/tell protocol.

They are told :class:`~evolve.search.objectives.Told` values (the per-task objective vector and
the floors' violation) instead of a fitness, and, like the others, follow from their seed and
their ask/tell calls alone, so the ledger's replay rebuilds them; none waits for a generation:

- ``mo-tpe`` (the default: scripts/bench_pareto.py's largest hypervolume on the toy zoo):
  optuna's TPE with several objectives (multivariate, with the constant liar for pending points;
  optuna's constraint handling ranks infeasible trials by violation).
- ``chebyshev-cmaes``: CMA-ES (with the genome's space-filling start) told an
  augmented Chebyshev scalarization of the objectives whose weights are drawn afresh, from a
  seeded stream, for every tell (ParEGO's idea on CMA-ES): each batch ranks the points by a
  different trade-off, so the search keeps CMA-ES's step adaptation while its samples spread
  along the front instead of converging to one point of it.  Objectives are normalized by the
  range seen so far; infeasible points rank after every feasible one, by violation.
- ``nsga2``: optuna's NSGA-II (steady-state under ask/tell: a trial's parents are the
  completed trials of the previous generation, never a barrier).

``mo-tpe`` and ``nsga2`` use optuna (a dependency of the project).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np

from evolve.config import DEFAULT_MO_STRATEGY
from evolve.search.objectives import Told
from evolve.search.pending import OptunaAsks, OptunaStrategyMembers
from merge_core.errors import RecipeError

__all__ = ["DEFAULT_MO_STRATEGY", "MO_DESIGN_STRATEGIES", "ChebyshevCMAES", "OptunaMO", "mo_registry"]

MO_DESIGN_STRATEGIES = ("chebyshev-cmaes",)
RHO = 0.05  # the augmentation: among equal Chebyshev values, prefer the better sum
WEIGHT_STREAM = 0xC4EB  # the weights' own stream of the run's seed, apart from CMA-ES's sampler


class ChebyshevCMAES:
    """A scalar strategy (``inner``: CMA-ES, maybe after a design) told random Chebyshev
    scalarizations of :class:`Told` values (see the module docstring)."""

    def __init__(self, inner: Any, *, seed: int, objectives: int) -> None:
        self.inner = inner
        self.seed = seed
        self.k = objectives
        self.tells = 0
        self.low = np.full(objectives, np.inf)  # the range of the successful objective values told so far
        self.high = np.full(objectives, -np.inf)
        self.last_weights: np.ndarray | None = None

    @property
    def popsize(self) -> int:
        return int(self.inner.popsize)

    @property
    def sigma(self) -> float:
        return float(self.inner.sigma)

    def ask(self, number: int) -> list[np.ndarray]:
        return list(self.inner.ask(number))

    def weights(self, tell: int) -> np.ndarray:
        """Tell ``tell``'s weights: uniform on the simplex, seeded by (seed, tell)."""
        return np.random.default_rng([self.seed, WEIGHT_STREAM, tell]).dirichlet(np.ones(self.k))

    def scalarize(self, told: Sequence[Told], weights: np.ndarray) -> list[float]:
        """Higher is better: -(max_i w_i g_i + RHO sum_i w_i g_i), g the normalized gap to the
        best seen; infeasible points below every feasible one (by violation), failures last."""
        span = np.where(self.high > self.low, self.high - self.low, 1.0)
        worst = -(1.0 + RHO * self.k)  # the lowest value a feasible point can get
        out = []
        for t in told:
            if t.failed:
                out.append(worst - 2.0)
                continue
            if t.violation > 0:
                out.append(worst - t.violation / (1.0 + t.violation) - 1e-9)
                continue
            gap = np.clip((self.high - np.asarray(t.values)) / span, 0.0, 1.0) * weights
            out.append(-(float(np.max(gap)) + RHO * float(np.sum(gap))))
        return out

    def tell(self, points: Sequence[np.ndarray], told: Sequence[Told]) -> None:
        for t in told:
            if not t.failed:
                self.low = np.minimum(self.low, t.values)
                self.high = np.maximum(self.high, t.values)
        self.last_weights = self.weights(self.tells)
        self.tells += 1
        self.inner.tell(points, self.scalarize(told, self.last_weights))

    def stop(self) -> dict[str, Any]:
        return dict(self.inner.stop())


class OptunaMO(OptunaStrategyMembers):
    """optuna's multi-objective TPE or NSGA-II behind the ask/tell protocol (module docstring)."""

    def __init__(self, x0: Sequence[float], sigma0: float, *, bounds: tuple[list[float], list[float]],
                 popsize: int, seed: int, objectives: int, sampler: str) -> None:
        try:
            import optuna
        except ImportError:
            raise RecipeError("search.strategy", f"{sampler} needs optuna: pip install 'merge-evolve[optuna]' (or "
                              "set search.strategy: chebyshev-cmaes, which needs nothing more)") from None
        optuna.logging.set_verbosity(logging.WARNING)
        # optuna >= 5 reads a trial's constraints from the trial (set_constraint); before, from a
        # constraints_func (deprecated since 5.0): each sampler then ranks infeasible trials by violation.
        self.native = hasattr(optuna.trial.Trial, "set_constraint")
        constraints = None if self.native else _violation_of
        if sampler == "mo-tpe":
            chosen: Any = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                                     n_startup_trials=max(popsize, 10), constraints_func=constraints)
        else:
            chosen = optuna.samplers.NSGAIISampler(seed=seed, population_size=max(popsize, 4),
                                                   constraints_func=constraints)
        self.study = optuna.create_study(directions=["maximize"] * objectives, sampler=chosen)
        self.pending = OptunaAsks(self.study, x0, bounds, popsize)  # the start point is the first trial

    def tell(self, points: Sequence[np.ndarray], told: Sequence[Told]) -> None:
        for point, value in zip(points, told):
            trial = self.pending.pop(point)
            if self.native:
                trial.set_constraint("violation", float(value.violation))
            else:
                trial.set_user_attr("violation", float(value.violation))
            self.study.tell(trial, [float(v) for v in value.values])


def _violation_of(trial: Any) -> list[float]:
    """optuna's constraint (<= 0 is feasible): the violation stored on the trial."""
    return [float(trial.user_attrs.get("violation", 0.0))]


def mo_registry(make_scalar: Callable[..., Any]) -> dict[str, Callable[..., Any]]:
    """The multi-objective strategies by name; ``make_scalar(name, x0, sigma0, **kwargs)`` builds
    a scalar one (with its design) for ``chebyshev-cmaes``."""

    def chebyshev(x0: Sequence[float], sigma0: float, *, objectives: int, **kwargs: Any) -> ChebyshevCMAES:
        return ChebyshevCMAES(make_scalar("cmaes", x0, sigma0, **kwargs), seed=kwargs["seed"], objectives=objectives)

    def optuna_one(sampler: str) -> Callable[..., OptunaMO]:
        def make(x0: Sequence[float], sigma0: float, *, objectives: int, design_size: int = 0,
                 design_space: Any = None, scales: Any = None, mirrors: bool = True, **kwargs: Any) -> OptunaMO:
            if design_size > 0:
                raise RecipeError("search.initial_design", f"{sampler} takes no initial design (its first trials "
                                  "are its own)")
            return OptunaMO(x0, sigma0, objectives=objectives, sampler=sampler, **kwargs)
        return make

    return {"chebyshev-cmaes": chebyshev, "mo-tpe": optuna_one("mo-tpe"), "nsga2": optuna_one("nsga2")}
