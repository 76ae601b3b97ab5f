"""Evaluation pools for tests that need no model: they score every job with fixed scores."""

from __future__ import annotations

from evolve.protocols import Result


class LastFirstPool:
    """A pool whose workers finish the latest submitted job first (out of order on purpose),
    each with ``scores``."""

    def __init__(self, scores: dict[str, float], num_workers: int = 2) -> None:
        self.scores = scores
        self.num_workers = num_workers
        self.jobs: list[str] = []

    def submit(self, eval_id, recipe, task_set, race=None) -> None:
        self.jobs.append(eval_id)

    def wait_any(self) -> list[Result]:
        done, self.jobs = self.jobs[::-1], []
        return [Result(i, scores=dict(self.scores)) for i in done]
