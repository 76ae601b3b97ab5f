"""Where Ray can put the evaluation workers: checked before they start, waited for with a limit.

A Ray actor whose resources no node can give waits forever (Ray only logs a warning, in case an
autoscaler adds a node), so a run asking for three 1-CPU workers on a 2-CPU cluster used to
hang with no output.  :func:`check_feasible` refuses such a request at once, from the alive
nodes' total resources (per node: an actor's CPUs and GPUs must fit on one node);
:func:`wait_placed` bounds the wait for resources that exist but are held by something else.
Both fail with one line (:class:`~evolve.workers.worker.WorkerPoolError`, exit 2) naming the
short resource, what one worker needs and what the cluster has.

Which cluster to join follows ``ray.init``'s own rule: an explicit address (``--ray-address``;
``local`` asks for a private Ray), else ``RAY_ADDRESS``, else the cluster that ``ray start`` last
started on this machine (while its GCS runs); joining never passes resources to ``ray.init``
(Ray refuses them), and only with none of these is a private local Ray started.
"""

from __future__ import annotations

import os
import time
from typing import Any

from evolve.workers.worker import WorkerPoolError

__all__ = ["PLACEMENT_TIMEOUT_S", "check_feasible", "cluster_address", "wait_placed"]

PLACEMENT_TIMEOUT_S = 120.0
"""Default wait for workers to be placed (``MERGE_EVOLVE_PLACEMENT_TIMEOUT`` overrides it):
starting an actor process takes seconds; minutes mean the resources are held elsewhere."""


def cluster_address(ray_address: str | None) -> str | None:
    """The Ray cluster to join, found as ``ray.init`` finds it; None: start a private local Ray.

    ``ray_address`` (``--ray-address``) first (``local``: private), else ``RAY_ADDRESS``, else the
    address file ``ray start`` leaves in Ray's temp dir, if a GCS process still serves it (a file
    left by a killed cluster would otherwise make the run wait on a dead address)."""
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    if address == "local":
        return None
    return address or started_cluster()


def started_cluster() -> str | None:
    """The address of the cluster ``ray start`` runs on this machine, or None."""
    try:  # Ray's own lookup (ray.init(address=None) uses it); no public API says this
        from ray._private.services import find_gcs_addresses
        from ray._private.utils import read_ray_address

        address = read_ray_address()
        return address if address and find_gcs_addresses() else None
    except Exception:  # another Ray layout: behave as before (a private Ray)
        return None


def placement_timeout() -> float:
    """Seconds :func:`wait_placed` waits (``MERGE_EVOLVE_PLACEMENT_TIMEOUT``, else the default)."""
    value = os.environ.get("MERGE_EVOLVE_PLACEMENT_TIMEOUT")
    try:
        return float(value) if value else PLACEMENT_TIMEOUT_S
    except ValueError:
        raise WorkerPoolError(f"MERGE_EVOLVE_PLACEMENT_TIMEOUT: expected seconds, got {value!r}") from None


def _need(cpus: float, gpus: float) -> dict[str, float]:
    return {name: amount for name, amount in (("CPU", cpus), ("GPU", gpus)) if amount > 0}


def _describe(need: dict[str, float]) -> str:
    return " and ".join(f"{amount:g} {name}{'s' if amount != 1 else ''}" for name, amount in need.items()) or \
        "no resources"


def check_feasible(workers: int, cpus: float, gpus: float, nodes: list[dict[str, Any]] | None = None) -> None:
    """Raise WorkerPoolError unless the alive nodes of the cluster can hold ``workers`` actors
    of ``cpus`` CPUs and ``gpus`` GPUs each (each actor on one node).  ``nodes``: ``ray.nodes()``
    (read from the connected cluster when None)."""
    if nodes is None:
        import ray

        nodes = ray.nodes()
    need = _need(cpus, gpus)
    if not need:
        return
    alive = [n.get("Resources") or {} for n in nodes if n.get("Alive", n.get("alive", False))]

    def room(names: list[str]) -> int:  # actors that fit, counting only these resources
        return sum(min(int(res.get(k, 0) // need[k]) for k in names) for res in alive)

    fits = room(list(need))
    if fits >= workers:
        return
    short = [k for k in need if room([k]) < workers] or list(need)  # else: not together on one node
    held = "; ".join(f"{sum(res.get(k, 0) for res in alive):g} {k}s in all, at most "
                     f"{max((res.get(k, 0) for res in alive), default=0):g} on one node" for k in short)
    advice = f"use --num-workers {fits}" if fits else "no node can hold one"
    raise WorkerPoolError(
        f"cannot place {workers} evaluation worker{'s' if workers != 1 else ''} of {_describe(need)} each: the Ray cluster "
        f"({len(alive)} node{'s' if len(alive) != 1 else ''}) has {held}: room for {fits}; {advice}")


def wait_placed(refs: list[Any], *, cpus: float, gpus: float, timeout: float | None = None) -> None:
    """Wait until every ref (one small call per new actor, answered once the actor runs) is
    answered; WorkerPoolError after ``timeout`` seconds (:func:`placement_timeout` when None),
    saying what the cluster has available (something else holds the rest)."""
    import ray

    timeout = placement_timeout() if timeout is None else timeout
    deadline = time.monotonic() + timeout
    pending = list(refs)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(left, 1.0))
    if not pending:
        return
    available = ray.available_resources()
    need = _need(cpus, gpus)
    free = " and ".join(f"{available.get(name, 0):g} {name}s" for name in need) or "what they need"
    raise WorkerPoolError(
        f"{len(pending)} of {len(refs)} evaluation workers could not be placed within {timeout:g} s: each needs "
        f"{_describe(need)}, the Ray cluster has {free} available (the rest is held by other work); "
        f"free it, use fewer --num-workers, or set MERGE_EVOLVE_PLACEMENT_TIMEOUT to wait longer")
