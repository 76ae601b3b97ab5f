"""The CMA-ES strategy (pycma) behind the driver: a seeded optimizer whose state can be saved.

pycma minimises; :meth:`CMAES.tell` takes fitnesses (maximised) and negates them.  Sampling uses
a private :class:`SeededNormal` (pycma's ``randn`` option), never the global numpy RNG, so a
seeded run asks the same candidates on every machine.  The state (the whole optimizer, sampler
included) is a pickle made by pycma's ``pickle_dumps``; :func:`load_state` reads it with an
unpickler that maps the class's old module path (``evolve.search``, before the package split)
to this one, so run directories written before the split still resume.
"""

from __future__ import annotations

import io
import pickle
import warnings
from typing import Any, Sequence

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pycma warns that matplotlib is missing
    import cma

__all__ = ["CMAES", "SeededNormal"]

# Where SeededNormal was pickled from by earlier versions (the class was evolve.search._SeededNormal).
_RENAMED = {("evolve.search", "_SeededNormal"): ("evolve.search.cmaes", "SeededNormal")}


class SeededNormal:
    """pycma's ``randn`` option: N(0, 1) from a private Generator, pickled with the optimizer."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


class _RenamingUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        module, name = _RENAMED.get((module, name), (module, name))
        return super().find_class(module, name)


class CMAES:
    """A bounded, seeded pycma CMA-ES: ``ask`` candidates, ``tell`` their fitnesses (maximised).

    ``scales`` is pycma's ``CMA_stds`` (per-gene step scale); ``seed`` seeds the sampler
    (``seed + 1``, as earlier versions did, so seeded trajectories are unchanged).
    """

    def __init__(self, x0: Sequence[float], sigma0: float, *, bounds: tuple[list[float], list[float]],
                 popsize: int, seed: int, scales: Sequence[float]) -> None:
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es = cma.CMAEvolutionStrategy(list(x0), sigma0, opts)

    @classmethod
    def from_state(cls, blob: bytes) -> "CMAES":
        """The strategy saved by :meth:`state` (this or an earlier version's)."""
        self = cls.__new__(cls)
        self.es = _RenamingUnpickler(io.BytesIO(blob)).load()
        return self

    def state(self) -> bytes:
        """The whole optimizer (sampler included) as bytes."""
        return self.es.pickle_dumps()

    def ask(self) -> list[np.ndarray]:
        """The next population (inside the bounds)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.es.ask()

    def tell(self, points: Sequence[np.ndarray], fitness: Sequence[float]) -> None:
        """Update with the asked ``points`` and their fitnesses (higher is better)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es.tell(list(points), [-f for f in fitness])

    @property
    def sigma(self) -> float:
        """The current overall step size."""
        return float(self.es.sigma)

    def stop(self) -> dict[str, Any]:
        """pycma's termination criteria that hold now (empty: go on)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(self.es.stop())

