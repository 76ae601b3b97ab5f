"""The CMA-ES strategy (pycma) behind the driver: a seeded optimizer, rebuilt by replay.

pycma minimises; :meth:`CMAES.tell` takes fitnesses (maximised) and negates them.  Sampling uses
a private :class:`SeededNormal` (pycma's ``randn`` option), never the global numpy RNG, so the
same asks and tells give the same points: a run's optimizer is rebuilt from its ledger by
replaying them (:mod:`evolve.search.trajectory`), never saved or loaded as a pickle.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pycma warns that matplotlib is missing
    import cma

__all__ = ["CMAES", "SeededNormal"]


class SeededNormal:
    """pycma's ``randn`` option: N(0, 1) from a private Generator (one stream per run)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


class CMAES:
    """A bounded, seeded pycma CMA-ES: ``ask`` candidates, ``tell`` their fitnesses (maximised).

    ``scales`` is pycma's ``CMA_stds`` (per-gene step scale); ``seed`` seeds the sampler
    (``seed + 1``, as earlier versions did, so seeded trajectories are unchanged).
    ``mirrors``: pycma's default (selective mirrored sampling for populations under 6).  Off for
    points asked one at a time: mirrors are injected at a tell for the next whole population,
    which single asks between tells never consume (pycma then refuses the next tell).
    """

    def __init__(self, x0: Sequence[float], sigma0: float, *, bounds: tuple[list[float], list[float]],
                 popsize: int, seed: int, scales: Sequence[float], mirrors: bool = True) -> None:
        opts = {
            "bounds": [list(bounds[0]), list(bounds[1])],
            "popsize": popsize,
            "seed": float("nan"),  # sampling uses our randn below, never the global numpy RNG
            "randn": SeededNormal(seed + 1),
            "CMA_stds": list(scales),
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
        }
        if not mirrors:
            opts["CMA_mirrors"] = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es = cma.CMAEvolutionStrategy(list(x0), sigma0, opts)

    def ask(self, number: int) -> list[np.ndarray]:
        """``number`` new points from the current distribution (inside the bounds)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return list(self.es.ask(number))

    def tell(self, points: Sequence[np.ndarray], fitness: Sequence[float]) -> None:
        """Update with the asked ``points`` and their fitnesses (higher is better)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es.tell(list(points), [-f for f in fitness])

    @property
    def popsize(self) -> int:
        """The population size (lambda)."""
        return int(self.es.popsize)

    @property
    def sigma(self) -> float:
        """The current overall step size."""
        return float(self.es.sigma)

    def stop(self) -> dict[str, Any]:
        """pycma's termination criteria that hold now (empty: go on)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(self.es.stop())

