"""One worker in this process: the pool for tests and ``--no-ray`` debugging."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from evolve.protocols import Result, one_line
from evolve.workers.worker import CandidateWorker, WorkerPoolError, WorkerSpec
from merge_core.errors import MergeError

__all__ = ["LocalPool"]


class LocalPool:
    """One :class:`CandidateWorker` in this process (``num_workers = 1``): tests and debugging.

    No isolation: a crash or a hang in a candidate takes the driver with it (use RayPool).
    """

    num_workers = 1

    def __init__(self, spec: WorkerSpec) -> None:
        try:
            self.worker = CandidateWorker(spec)
        except MergeError:
            raise
        except Exception as exc:  # same one line as the Ray pool's (the actor's one_line)
            raise WorkerPoolError(f"local-0 failed to set up: {one_line(exc)}") from None
        self.queue: deque[tuple[str, dict[str, Any], str, Any]] = deque()
        self.first_submit: float | None = None
        self.busy_s = 0.0

    def submit(self, eval_id: str, recipe: dict[str, Any], task_set: str, race: Any = None) -> None:
        """Queue a job; it runs in the next :meth:`wait_any`."""
        if self.first_submit is None:
            self.first_submit = time.monotonic()
        self.queue.append((eval_id, recipe, task_set, race))

    def wait_any(self) -> list[Result]:
        """Run the oldest queued job and return its result."""
        if not self.queue:
            raise RuntimeError("wait_any() called with no job submitted")
        start = time.monotonic()
        result = self.worker.run(*self.queue.popleft())
        self.busy_s += time.monotonic() - start
        return [result]

    def stats(self) -> dict[str, Any]:
        """Busy seconds, evaluations, setup time and busy fraction of the one worker."""
        wall = time.monotonic() - self.first_submit if self.first_submit is not None else 0.0
        return {
            "wall_s": wall,
            "busy_fraction": self.busy_s / wall if wall > 0 else 0.0,
            "restarts": 0,
            "workers": [{"name": self.worker.name, "run_s": self.busy_s, "busy_s": self.busy_s,
                         "evaluations": self.worker.evaluations, "restarts": 0, "timeouts": 0,
                         "setup_s": [self.worker.setup_seconds],
                         "busy_fraction": self.busy_s / wall if wall > 0 else 0.0}],
        }

    def release_idle(self, keep: int = 0) -> None:
        """Nothing to release: the one worker is this process."""

    def close(self) -> None:
        """Release the worker."""
        self.worker.close()
