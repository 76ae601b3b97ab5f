"""RayPool: one warm :class:`~evolve.workers.worker.CandidateWorker` per Ray actor, with fault isolation.

- Actors start in parallel (model load, input load, lm-eval task build once per actor); the
  constructor waits until all are ready and raises if one cannot set itself up (a config or
  model problem: every worker would hit it).
- ``submit`` queues a job and hands it to an idle actor; ``wait_any`` blocks (``ray.wait``)
  until at least one job finished and returns every finished one.
- A dead actor (``RayActorError``: OOM kill, segfault, ``os._exit``) or a job running longer
  than ``timeout`` seconds (the actor is killed) costs only that job: the actor is replaced by
  a fresh one and the job retried, up to ``max_retries`` times, then reported as
  ``Result(status="failed")``.  The clock of a job starts when its actor is ready, so a
  replacement's setup does not count against it.
- CPU threads: each actor gets ``threads`` torch/OMP threads (``workers x threads <= cores``,
  two actors with default threads ran 6x slower); on GPUs each actor takes one GPU.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from evolve.protocols import Result, one_line
from evolve.workers.placement import check_feasible, cluster_address, wait_placed
from evolve.workers.reaper import start_reaper, stop_reaper
from evolve.workers.worker import CandidateWorker, WorkerPoolError, WorkerSpec
from merge_core.errors import MergeError

__all__ = ["ActorWorker", "RayPool", "WorkerPoolError", "memory_lines"]

log = logging.getLogger(__name__)

# Forwarded to actors (a joined cluster does not inherit this process's environment).
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE",
                  "TRANSFORMERS_OFFLINE")


class ActorWorker:
    """The Ray actor body: a CandidateWorker built in the actor process.

    A setup error is kept and reported by :meth:`info` as one line (Ray's own report of a failed
    creation task is a multi-line traceback): a user-input error (MergeError) as its own message,
    which the driver shows exactly as a run without Ray would; anything else with its type.

    The constructor only records where the actor runs, so that :meth:`placed` answers as soon as
    Ray has placed it (the driver bounds that wait: :mod:`evolve.workers.placement`); the worker
    itself (model, inputs, tasks: the slow part) is built by the first :meth:`info` call.
    """

    def __init__(self, spec: WorkerSpec, name: str) -> None:
        import ray

        self.spec, self.name = spec, name
        self.worker: CandidateWorker | None = None
        self.error: str | None = None
        self.input_error = False
        self.node = ray.get_runtime_context().get_node_id()  # which machine: ledgered with each result

    def placed(self) -> str:
        """The node this actor runs on (answered at once: the placement probe)."""
        return self.node

    def _build(self) -> None:
        if self.worker is not None or self.error is not None:
            return
        try:
            self.worker = CandidateWorker(self.spec, name=self.name)
        except MergeError as exc:
            self.error, self.input_error = str(exc), True
        except Exception as exc:
            self.error = one_line(exc)

    def info(self) -> dict[str, Any]:
        """Setup seconds, pid and torch threads; or ``{"error", "input_error"}`` when setup failed
        (the first call builds the worker)."""
        self._build()
        if self.worker is None:
            return {"error": self.error, "input_error": self.input_error, "pid": os.getpid(), "node": self.node}
        return {"setup_s": self.worker.setup_seconds, "pid": os.getpid(), "threads": torch.get_num_threads(),
                "memory": self.worker.memory_report(), "node": self.node}

    def run(self, eval_id: str, recipe: dict[str, Any], task_set: str, race: Any = None) -> Result:
        """:meth:`CandidateWorker.run` in the actor."""
        if self.worker is None:
            raise RuntimeError(f"worker setup failed: {self.error}")
        result = self.worker.run(eval_id, recipe, task_set, race)
        result.node = self.node
        return result

    def ping(self) -> float:
        """The actor's clock (a liveness probe)."""
        return time.perf_counter()


@dataclass
class _Job:
    eval_id: str
    recipe: dict[str, Any]
    task_set: str
    race: Any = None  # an evolve.racing.RaceJob
    attempts: int = 0  # attempts started so far
    errors: list[str] = field(default_factory=list)


@dataclass
class _Slot:
    """One worker position; its actor is replaced when it dies or hangs."""

    name: str
    actor: Any = None
    placed_ref: Any = None  # ``placed()`` of a starting actor: answered once Ray placed it
    ready_ref: Any = None  # pending ``info()`` of a starting actor
    ready: bool = False
    job: _Job | None = None
    run_ref: Any = None
    started: float | None = None  # monotonic time the job began running on a ready actor
    busy_s: float = 0.0  # driver's view: job start on a ready actor -> result seen
    run_s: float = 0.0  # inside CandidateWorker.run(), as the actor reports it
    evaluations: int = 0
    restarts: int = 0
    timeouts: int = 0
    setup_s: list[float] = field(default_factory=list)
    pid: int | None = None
    released: int = 0  # times release_idle let its actor go
    node: str | None = None  # Ray node id of the current actor
    memory: str = ""  # where its merge inputs live and what they take (CandidateWorker.memory_report)


def memory_lines(slots: list[Any]) -> list[str]:
    """Every worker's memory line, workers with the same line on one: ``worker-0, worker-1: ...``."""
    names: dict[str, list[str]] = {}
    for slot in slots:
        if slot.memory:
            names.setdefault(slot.memory, []).append(slot.name)
    return [f"{', '.join(who)}: {line}" for line, who in names.items()]


class RayPool:
    """``num_workers`` Ray actors evaluating candidates (see the module docstring).

    ``ray_address``: None starts a local Ray (unless one is already initialised in this
    process); "auto" or "ray://host:port" joins a cluster.  ``num_gpus_per_worker``: 1 on GPU
    machines (one worker per GPU).  ``timeout``: seconds one job may run (None: no limit).
    ``max_retries``: how often a job whose actor died or hung is retried on a fresh actor.
    ``threads`` overrides ``spec.threads`` (None and spec.threads None: cores // workers on CPU).
    """

    def __init__(
        self,
        spec: WorkerSpec,
        num_workers: int | None,
        *,
        ray_address: str | None = None,
        num_gpus_per_worker: float = 0,
        timeout: float | None = None,
        max_retries: int = 2,
        threads: int | None = None,
        report: bool = False,
    ) -> None:
        import ray

        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if num_workers is None and not num_gpus_per_worker:
            raise ValueError("num_workers=None (one per GPU of the cluster) needs GPU workers")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.num_workers = int(num_workers or 1)
        self.timeout = timeout
        self.max_retries = int(max_retries)
        cores = os.cpu_count() or 1
        threads = threads or spec.threads or (4 if num_gpus_per_worker else max(1, cores // self.num_workers))
        self.spec = dataclasses.replace(spec, threads=threads)
        self._owns_ray = False
        self._reaper: Any = None  # watchdog of a local Ray we started (evolve.workers.reaper)
        self.memory_report: str | None = None  # the first worker's merge-memory line (see run.py)
        self.report = report
        if not ray.is_initialized():
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            quiet = {"log_to_driver": False, "logging_level": "ERROR"}
            address = cluster_address(ray_address)  # found as ray.init finds it (placement.py)
            if address:  # the cluster's own resources: Ray refuses num_cpus/num_gpus when joining
                ray.init(address=address, **quiet)
            else:  # "local", and no RAY_ADDRESS (Ray would read it first): never a running cluster
                os.environ.pop("RAY_ADDRESS", None)
                ray.init(address="local", num_cpus=max(cores, self.num_workers * threads), include_dashboard=False,
                         _node_ip_address="127.0.0.1", **quiet)
                self._reaper = _start_reaper()
            self._owns_ray = True
        if num_workers is None:  # one worker per GPU of the (possibly multi-node) cluster
            self.num_workers = max(1, int(ray.cluster_resources().get("GPU", 0) // num_gpus_per_worker))
        env = {name: os.environ[name] for name in _FORWARDED_ENV if name in os.environ}
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                    "TOKENIZERS_PARALLELISM": "false"})
        # num_cpus reserves the threads on the node; num_gpus=1 pins one GPU per actor.
        self._actor_class = ray.remote(ActorWorker).options(
            num_cpus=0 if num_gpus_per_worker else threads,
            num_gpus=num_gpus_per_worker,
            max_restarts=0,  # we replace actors ourselves, to count and retry per job
            runtime_env={"env_vars": env},
            # Across a cluster's nodes rather than packed onto the first: a slow or lost node
            # then costs the fewest workers (GPU workers are one per GPU either way).
            scheduling_strategy="SPREAD",
        )
        self.slots = [_Slot(name=f"worker-{i}") for i in range(self.num_workers)]
        self.queue: deque[_Job] = deque()
        self.first_submit: float | None = None
        self.restarts = 0
        started = time.monotonic()
        need = {"cpus": 0 if num_gpus_per_worker else threads, "gpus": num_gpus_per_worker}
        try:
            check_feasible(self.num_workers, **need)  # else the actors would wait forever
            for slot in self.slots:
                self._start_actor(slot)
            wait_placed([slot.placed_ref for slot in self.slots], **need)
            for slot in self.slots:
                self._mark_ready(slot, ray.get(slot.ready_ref))
            if self.report:
                for line in memory_lines(self.slots):
                    print(line, file=sys.stderr)
        except WorkerPoolError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise WorkerPoolError(f"an evaluation worker failed to start: {_cause(exc)}") from None
        self.startup_s = time.monotonic() - started

    # -- actors ---------------------------------------------------------------------------

    def _start_actor(self, slot: _Slot) -> None:
        slot.actor = self._actor_class.remote(self.spec, slot.name)
        slot.placed_ref = slot.actor.placed.remote()  # before info(): actor calls run in order
        slot.ready_ref = slot.actor.info.remote()
        slot.ready = False

    def _mark_ready(self, slot: _Slot, info: dict[str, Any]) -> None:
        if info.get("error"):
            if info.get("input_error"):
                raise WorkerPoolError(str(info["error"]))
            raise WorkerPoolError(f"{slot.name} failed to set up: {info['error']}")
        slot.ready, slot.ready_ref = True, None
        slot.setup_s.append(float(info["setup_s"]))
        slot.pid = info["pid"]
        slot.node = info.get("node")
        slot.memory = str(info.get("memory") or "")
        if self.memory_report is None and slot.memory:
            self.memory_report = slot.memory
        if slot.job is not None and slot.started is None:
            slot.started = time.monotonic()

    def _replace_actor(self, slot: _Slot, why: str) -> None:
        import ray

        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # already dead
            pass
        slot.restarts += 1
        self.restarts += 1
        log.warning("%s: %s; starting a fresh actor (restart %d)", slot.name, why, slot.restarts)
        self._start_actor(slot)

    def _launch(self, slot: _Slot, job: _Job) -> None:
        job.attempts += 1
        slot.job = job
        slot.run_ref = slot.actor.run.remote(job.eval_id, job.recipe, job.task_set, job.race)
        slot.started = time.monotonic() if slot.ready else None

    def _dispatch(self) -> None:
        for slot in self.slots:
            if not self.queue:
                return
            if slot.job is None:
                if slot.actor is None:  # released by release_idle: a fresh one for late work
                    self._start_actor(slot)
                self._launch(slot, self.queue.popleft())

    def release_idle(self, keep: int = 0) -> None:
        """Kill idle actors but ``keep`` (the run has nothing more for them): on a cluster their
        GPUs are free for other work at once instead of after the slowest last candidate."""
        import ray

        idle = [s for s in self.slots if s.job is None and s.actor is not None and s.ready]
        for slot in idle[keep:]:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # already dead
                pass
            slot.actor, slot.ready, slot.ready_ref = None, False, None
            slot.released += 1

    # -- EvaluationPool -------------------------------------------------------------------

    def submit(self, eval_id: str, recipe: dict[str, Any], task_set: str, race: Any = None) -> None:
        """Queue a job and start it on an idle actor if there is one."""
        if self.first_submit is None:
            self.first_submit = time.monotonic()
        self.queue.append(_Job(eval_id, recipe, task_set, race))
        self._dispatch()

    def wait_any(self) -> list[Result]:
        """Block until at least one job finished (or failed for good); return all finished."""
        import ray

        if not self.queue and all(s.job is None for s in self.slots):
            raise RuntimeError("wait_any() called with no job submitted")
        while True:
            self._dispatch()
            # Readiness first: a replacement that failed setup must raise, not fail its job.
            refs = {s.ready_ref: s for s in self.slots if s.ready_ref is not None}
            refs.update({s.run_ref: s for s in self.slots if s.job is not None})
            done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
            if not done:
                done, _ = ray.wait(list(refs), num_returns=1, timeout=self._wait_timeout())
            results: list[Result] = []
            for ref in done:
                slot = refs[ref]
                if ref is slot.ready_ref:
                    self._on_ready(slot)
                elif ref is slot.run_ref:
                    results.extend(self._on_finished(slot))
            results.extend(self._check_timeouts())
            if results:
                self._dispatch()
                return results

    def _wait_timeout(self) -> float | None:
        if self.timeout is None:
            return None
        now = time.monotonic()
        ends = [s.started + self.timeout - now for s in self.slots if s.job is not None and s.started is not None]
        # A job waiting for its actor's setup has no clock yet; its readiness wakes us up.
        return max(min(ends), 0.0) + 0.01 if ends else None

    def _on_ready(self, slot: _Slot) -> None:
        import ray

        try:
            self._mark_ready(slot, ray.get(slot.ready_ref))
        except WorkerPoolError:
            raise
        except Exception as exc:
            raise WorkerPoolError(f"{slot.name}: a replacement worker failed to start: {_cause(exc)}") from None

    def _on_finished(self, slot: _Slot) -> list[Result]:
        import ray
        from ray.exceptions import RayActorError

        job, started = slot.job, slot.started
        try:
            result = ray.get(slot.run_ref)
        except RayActorError as exc:
            return self._retry_or_fail(slot, f"worker died ({type(exc).__name__})")
        except Exception as exc:  # e.g. the result did not unpickle: not the actor's fault
            result = Result(eval_id=job.eval_id, status="failed", reason=one_line(exc))
        now = time.monotonic()
        busy = now - started if started is not None else 0.0
        slot.busy_s += busy
        slot.evaluations += 1
        slot.job, slot.run_ref, slot.started = None, None, None
        result.worker = result.worker or slot.name
        run_s = result.timings.get("run")
        if run_s is not None:
            slot.run_s += run_s
            result.timings["overhead"] = max(busy - run_s, 0.0)  # Ray round trip + queueing
        if job.attempts > 1:
            result.timings["attempts"] = float(job.attempts)
        return [result]

    def _check_timeouts(self) -> list[Result]:
        if self.timeout is None:
            return []
        now = time.monotonic()
        out = []
        for slot in self.slots:
            if slot.job is not None and slot.started is not None and now - slot.started > self.timeout:
                slot.timeouts += 1
                out.extend(self._retry_or_fail(slot, f"timed out after {self.timeout:g} s"))
        return out

    def _retry_or_fail(self, slot: _Slot, why: str) -> list[Result]:
        """The job's actor is dead or hung: replace the actor; retry the job or give up on it."""
        job, started = slot.job, slot.started
        if started is not None:
            slot.busy_s += time.monotonic() - started
        slot.job, slot.run_ref, slot.started = None, None, None
        job.errors.append(why)
        self._replace_actor(slot, f"{job.eval_id}: {why}")
        if job.attempts <= self.max_retries:
            self._launch(slot, job)  # on the fresh actor: its clock starts once it is ready
            return []
        slot.evaluations += 1
        reason = f"{why} (attempt {job.attempts} of {job.attempts}; earlier: {'; '.join(job.errors[:-1]) or 'none'})"
        return [Result(eval_id=job.eval_id, status="failed", reason=reason, worker=slot.name)]

    # -- reporting and shutdown -----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Per-worker counters and the busy fraction, over the wall time since the first submit.

        ``run_s``: seconds inside ``CandidateWorker.run`` (finished jobs); ``busy_s``: seconds a
        job was out on a ready actor as the driver saw it (adds the Ray round trip, and time
        the driver took to collect a result).  ``busy_fraction`` = run_s / wall.
        """
        now = time.monotonic()
        wall = now - self.first_submit if self.first_submit is not None else 0.0
        workers = []
        for s in self.slots:
            busy = s.busy_s + (now - s.started if s.started is not None else 0.0)
            workers.append({"name": s.name, "run_s": s.run_s, "busy_s": busy, "evaluations": s.evaluations,
                            "restarts": s.restarts, "timeouts": s.timeouts, "setup_s": list(s.setup_s),
                            "pid": s.pid, "node": s.node, "busy_fraction": s.run_s / wall if wall > 0 else 0.0})
        total = sum(w["run_s"] for w in workers)
        return {"wall_s": wall, "startup_s": self.startup_s, "restarts": self.restarts, "queued": len(self.queue),
                "busy_fraction": total / (wall * len(workers)) if wall > 0 else 0.0, "workers": workers}

    def close(self) -> None:
        """Kill the actors; shut Ray down if this pool started it."""
        import ray

        for slot in self.slots:
            if slot.actor is not None:
                try:
                    ray.kill(slot.actor, no_restart=True)
                except Exception:
                    pass
                slot.actor = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False
        if self._reaper is not None:
            stop_reaper(self._reaper)  # removes whatever the shutdown left running
            self._reaper = None

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _start_reaper() -> Any:
    """The watchdog that removes this local Ray's processes if this process dies (None when the
    session directory cannot be found: Ray's private API moved)."""
    import ray

    try:
        session_dir = ray._private.worker._global_node.get_session_dir_path()
    except AttributeError:
        log.warning("cannot find the Ray session directory: no watchdog for a killed driver")
        return None
    return start_reaper(session_dir)


def _cause(exc: BaseException) -> str:
    """One line about a Ray error (Ray's messages carry tracebacks and actor details)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
