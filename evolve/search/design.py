"""A space-filling start for CMA-ES: score a scrambled Sobol design, then search from its best.

CMA-ES is a local method: started at mergekit-evolve's point (every weight 1/M) with a step of
a sixth of the box, it climbs the nearest basin.  On the toy zoo that is often a basin where one
expert's skill wins and the others are lost (three of ten seeds ended near 0.5 in 100
evaluations, where the zoo's best global weights reach 0.69).  A short design first looks at the
whole box, and CMA-ES then starts where the design found the most.

:class:`InitialDesign` wraps any strategy built from a start point (``make_inner(x0)``):

- The first ``size`` results are the design: the start point itself (so the run's usual start
  is always scored), then the points of a scrambled Sobol sequence of the genome's design space
  (:meth:`evolve.genome.Genome.design_point`: for merge recipes one value per model and gene,
  shared by every layer group — the whole-model merges practice starts from — then placed in
  the box), seeded by the run's seed.
- While fewer than ``size`` design results are told, every ask gets the next design point (so
  an asynchronous pool never waits for the design to finish).
- Once ``size`` are told, the inner strategy is built at the best design point (ties: the
  earliest) and every later tell is its.  Design points still out on workers at the switch
  come back in its batches like any point it did not ask: pycma's tell clips such points to
  steps its distribution could have taken (its default for foreign solutions).

Everything follows from the seed and the ask/tell calls, so the ledger's replay rebuilds it.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import numpy as np

__all__ = ["DesignSpace", "InitialDesign", "default_design_size"]

# Sobol's scramble draws from its own stream of the run's seed, apart from CMA-ES's sampler.
DESIGN_STREAM = 0x5D


class DesignSpace(Protocol):
    """What a genome offers a design: a unit cube and its map into the genome's box."""

    @property
    def design_dimension(self) -> int:
        """The unit cube's dimensions."""

    def design_point(self, u: Sequence[float]) -> np.ndarray:
        """The genome vector of the cube's point ``u``."""


def default_design_size(popsize: int) -> int:
    """The design's evaluations by default: two populations (bench_search.py's measurements)."""
    return 2 * popsize


class InitialDesign:
    """A Sobol design, then ``make_inner(best design point)`` (see the module docstring).

    ``design_point`` maps a point of the unit cube of ``design_dimension`` dimensions to a
    genome vector in the box; ``popsize`` is the tell batch while the design runs; ``sigma0`` is
    reported as the step until the inner strategy exists.
    """

    def __init__(self, start: Sequence[float], *, size: int, popsize: int, seed: int, design_dimension: int,
                 design_point: Callable[[np.ndarray], np.ndarray], make_inner: Callable[[np.ndarray], Any],
                 sigma0: float) -> None:
        from scipy.stats import qmc

        if size < 1:
            raise ValueError(f"a design needs at least one point, got {size}")
        self.size = size
        self._popsize = popsize
        self._sigma0 = sigma0
        self._start = np.asarray(start, dtype=np.float64)
        self._design_point = design_point
        self._make_inner = make_inner
        self._sobol = qmc.Sobol(design_dimension, scramble=True, rng=np.random.default_rng([seed, DESIGN_STREAM]))
        self.asked = 0  # design points handed out
        self.told: list[tuple[float, int, np.ndarray]] = []  # (fitness, ask order, point)
        self._order: dict[bytes, int] = {}  # design point -> its ask order
        self.inner: Any = None

    @property
    def best_design_point(self) -> np.ndarray | None:
        """The inner strategy's start (None while the design runs)."""
        if len(self.told) < self.size:
            return None
        return max(self.told, key=lambda t: (t[0], -t[1]))[2]

    @property
    def popsize(self) -> int:
        return self._popsize if self.inner is None else int(self.inner.popsize)

    @property
    def sigma(self) -> float:
        return self._sigma0 if self.inner is None else float(self.inner.sigma)

    def ask(self, number: int) -> list[np.ndarray]:
        if self.inner is not None:
            return list(self.inner.ask(number))
        out = []
        for _ in range(number):
            point = self._start.copy() if self.asked == 0 else self._design_point(self._sobol.random(1)[0])
            self._order[point.tobytes()] = self.asked
            self.asked += 1
            out.append(point)
        return out

    def tell(self, points: Sequence[np.ndarray], fitness: Sequence[float]) -> None:
        if self.inner is not None:
            self.inner.tell(points, fitness)
            return
        for point, value in zip(points, fitness):
            point = np.asarray(point, dtype=np.float64)
            self.told.append((float(value), self._order.get(point.tobytes(), self.asked), point))
        if len(self.told) >= self.size:
            self.inner = self._make_inner(self.best_design_point)

    def stop(self) -> dict[str, Any]:
        return {} if self.inner is None else self.inner.stop()
