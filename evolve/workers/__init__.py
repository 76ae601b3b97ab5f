"""Evaluation workers and the pools that run them (the :class:`~evolve.protocols.EvaluationPool`s).

- :class:`WorkerSpec` / :class:`CandidateWorker` (:mod:`.worker`): one resident model and its
  loaded inputs; merges a candidate in place, checks it and scores it.
- :class:`LocalPool` (:mod:`.local`): one worker in this process (tests, ``--no-ray``).
- :class:`RayPool` (:mod:`.ray_pool`): one worker per Ray actor, with crash and timeout
  isolation (ray itself is imported only when a pool is built).
"""

from evolve.workers.local import LocalPool
from evolve.workers.ray_pool import RayPool, WorkerPoolError
from evolve.workers.worker import CandidateWorker, WorkerSpec

__all__ = ["CandidateWorker", "LocalPool", "RayPool", "WorkerPoolError", "WorkerSpec"]
