"""The optuna trials asked and not told yet, by point (the optuna strategies' ask/tell bridge).

The trajectory tells points, not trials: each told point is matched to a trial asked for it.
Two asks may give the same point (NSGA-II's crossover and mutation can repeat a parent; an
enqueued start point can be proposed again), so each point keeps a queue of its trials, told in
ask order; a replayed point that differs from the asked one by float noise (another machine's
BLAS) takes the nearest pending point's oldest trial.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

import numpy as np

__all__ = ["OptunaAsks", "OptunaStrategyMembers", "PendingTrials"]


class PendingTrials:
    """Trials asked and not told yet, by point (see the module docstring)."""

    def __init__(self) -> None:
        self._by_point: dict[bytes, deque[Any]] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._by_point.values())

    def add(self, point: np.ndarray, trial: Any) -> None:
        """Remember ``trial`` as asked for ``point``."""
        self._by_point.setdefault(np.asarray(point, dtype=np.float64).tobytes(), deque()).append(trial)

    def pop(self, point: Any) -> Any:
        """The oldest trial asked for ``point`` (else for the nearest pending point); removed."""
        key = np.asarray(point, dtype=np.float64).tobytes()
        if key not in self._by_point:
            if not self._by_point:
                raise KeyError("no trial is pending: a point was told twice")
            target = np.asarray(point, dtype=np.float64)
            key = min(self._by_point, key=lambda k: float(np.max(np.abs(np.frombuffer(k) - target))))
        queue = self._by_point[key]
        trial = queue.popleft()
        if not queue:
            del self._by_point[key]
        return trial


class OptunaAsks(PendingTrials):
    """The optuna strategies' asking: each asked point a trial of ``study`` over the box
    ``bounds`` (one float parameter per coordinate, ``x0000``...), remembered until told;
    ``sigma`` is the spread of the last ``popsize`` points asked."""

    def __init__(self, study: Any, x0: Sequence[float], bounds: tuple[Sequence[float], Sequence[float]],
                 popsize: int) -> None:
        import optuna

        super().__init__()
        lo, hi = bounds
        self.study, self.popsize = study, popsize
        self.names = [f"x{i:04d}" for i in range(len(lo))]
        self.distributions = {n: optuna.distributions.FloatDistribution(float(a), float(b))
                              for n, a, b in zip(self.names, lo, hi)}
        # The start point (inside the box) is the study's first trial.
        study.enqueue_trial({n: float(np.clip(v, a, b)) for n, v, a, b in zip(self.names, x0, lo, hi)})
        self.recent: list[np.ndarray] = []

    def ask(self, number: int) -> list[np.ndarray]:
        """``number`` new points, each a trial asked of the study."""
        out = []
        for _ in range(number):
            trial = self.study.ask(self.distributions)
            point = np.array([trial.params[n] for n in self.names], dtype=np.float64)
            self.add(point, trial)
            out.append(point)
        self.recent = (self.recent + out)[-self.popsize:]
        return out

    @property
    def sigma(self) -> float:
        """Mean per-coordinate spread of the last ``popsize`` points asked."""
        return float(np.mean(np.std(self.recent, axis=0))) if len(self.recent) > 1 else 0.0


class OptunaStrategyMembers:
    """What the optuna strategies (tpe, mo-tpe, nsga2) answer alike, from their ``pending``
    :class:`OptunaAsks`: ``popsize``, ``sigma``, ``ask`` and ``stop`` (they never stop early)."""

    pending: OptunaAsks

    @property
    def popsize(self) -> int:
        return self.pending.popsize

    @property
    def sigma(self) -> float:
        return self.pending.sigma

    def ask(self, number: int) -> list[np.ndarray]:
        return self.pending.ask(number)

    def stop(self) -> dict[str, Any]:
        return {}
