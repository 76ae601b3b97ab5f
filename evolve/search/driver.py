"""The search driver: asks candidates, feeds an evaluation pool, tells fitnesses, survives kills.

Fitness and penalty: :mod:`evolve.search.fitness`.  The optimizer: :mod:`evolve.search.cmaes`.

Scheduling policy (deterministic trajectory, workers kept busy):

- Generation g+1 is asked only after ``tell(g)``: a seeded run's candidates and ranking never
  depend on timing. To keep the pool full inside a generation, at most ``num_workers`` jobs are
  in flight and a freed slot is refilled at once; the popsize defaults to pycma's
  ``4 + floor(3 ln n)`` rounded up to a multiple of the worker count (:func:`default_popsize`).
- While the last candidates of a generation run, idle slots take held-out re-scoring jobs
  (lowest priority, FIFO): after ``tell(g)``, the best candidate of generation g is queued for
  the ``held_out`` tasks when it beats every earlier generation's best. That set depends only on
  the fitnesses, so it is the same whatever the timing; the run ends once it is drained.
- Candidates are evaluated with eval ids ``g{g:05d}-{i:04d}`` (held-out: ``<id>/held_out``).
- Fitness cache: a candidate whose recipe hash equals an earlier candidate's (earlier in
  (generation, index) order, this or a previous session) is not evaluated; it is ledgered with
  ``cached_from`` and that result. If the earlier one is still running, it waits for it.
- Budget: generations are asked while fewer than ``max_fevals`` candidates were told (so the
  last generation may pass it), and while pycma's own stop criteria hold.

Crash safety (kill -9 at any instant):

- The optimizer state (including its private normal sampler, seeded from ``seed``; the global
  numpy RNG is never used) is saved atomically after every ``tell`` and once before the first
  ask, with the number of the next generation. Loading it and asking again gives bit-identical
  candidates.
- Every result is appended to the ledger (whole line, fsync) before anything depends on it.
- On resume the in-flight generation is re-asked from the saved state; its candidates already in
  the ledger are taken from there (their vectors must match exactly, else the run refuses), only
  the others are submitted. A kill after the ledger write and before the state save just re-tells
  that generation from the ledger. No ledgered evaluation is ever run again, and the final ledger
  (minus worker ids, timings and line order) and best equal those of an uninterrupted run.
"""

from __future__ import annotations

import math
import pickle
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import yaml

from evolve.config import EvolveConfig, TaskConfig, config_hash, normalized_config
from evolve.genome import Genome, recipe_hash
from evolve.protocols import HELD_OUT, TRAIN, EvaluationPool, Result, SearchObserver
from evolve.search.cmaes import CMAES
from evolve.search.failures import FailureWatch
from evolve.search.fitness import default_penalty, json_scores, weighted_fitness
from evolve.search.provenance import best_provenance, package_versions
from evolve.storage import RunStorage, StorageError

STATE_FORMAT = 1
# Settings a resumed run must share with the stored one (the budget may grow).
RESUME_KEYS = ("config", "seed", "popsize", "sigma0", "penalty", "num_layers", "dimension")

@dataclass
class SearchOutcome:
    """Summary of a finished search (the ledger has every detail)."""

    best: dict[str, Any] | None  # ledger record of the best train candidate
    best_recipe: dict[str, Any] | None
    best_held_out: dict[str, Any] | None  # its held-out ledger record, when held_out tasks exist
    generations: int
    candidates: int  # candidates told to the strategy
    evaluations: int  # train evaluations actually run (cache hits excluded), all sessions
    held_out_evaluations: int
    stop_reason: str
    busy_fraction: float  # this session: busy worker-seconds / (workers x wall seconds)


def default_popsize(dimension: int, num_workers: int = 1) -> int:
    """pycma's default population size rounded up to a multiple of ``num_workers``."""
    base = 4 + int(3 * math.log(max(dimension, 1)))
    workers = max(num_workers, 1)
    return -(-base // workers) * workers


@dataclass
class _Generation:
    number: int
    points: list[np.ndarray]  # as asked (tell needs these)
    recipes: list[dict[str, Any]]
    hashes: list[str]
    ids: list[str]
    fitness: list[float | None]


def eval_id(generation: int, index: int) -> str:
    """The ledger id of candidate ``index`` of ``generation``."""
    return f"g{generation:05d}-{index:04d}"


class SearchDriver:
    """Owns the ask/evaluate/tell loop for one run directory (see the module docstring).

    ``genome`` maps vectors to recipes; ``storage`` is the run directory (resumed if it holds a
    run with the same config, seed, popsize, sigma0 and penalty; ``max_fevals`` may grow);
    ``sigma0`` is CMA-ES's initial step (mergekit-evolve's default 1/6, per unit of a weight's
    range); ``popsize`` None = :func:`default_popsize` for the pool's workers (then kept on
    resume); ``penalty`` is the fitness of a failed candidate (None = :func:`default_penalty`);
    ``versions`` overrides the package versions recorded for provenance; ``deadline`` is a
    ``time.monotonic()`` instant after which no new generation is asked.
    """

    def __init__(
        self,
        genome: Genome,
        storage: RunStorage,
        config: EvolveConfig,
        *,
        sigma0: float = 1 / 6,
        popsize: int | None = None,
        seed: int = 0,
        max_fevals: int = 100,
        penalty: float | None = None,
        versions: dict[str, str] | None = None,
        observers: Sequence[SearchObserver] = (),
        deadline: float | None = None,
    ) -> None:
        if sigma0 <= 0 or not math.isfinite(sigma0):
            raise ValueError(f"sigma0 must be a positive number, got {sigma0}")
        if popsize is not None and popsize < 2:
            raise ValueError(f"popsize must be >= 2, got {popsize}")
        if max_fevals < 1:
            raise ValueError(f"max_fevals must be >= 1, got {max_fevals}")
        self.genome = genome
        self.storage = storage
        self.config = config
        self.sigma0 = float(sigma0)
        self.popsize = popsize
        self.seed = int(seed)
        self.max_fevals = int(max_fevals)
        self.penalty = float(default_penalty(config.tasks) if penalty is None else penalty)
        self.versions = package_versions() if versions is None else versions
        self.observers = list(observers)
        self.deadline = deadline
        # Run state, filled by run() (_open replays what a stored run already holds).
        self.records: dict[str, dict[str, Any]] = {}
        self.popsize_ = 0
        self.manifest: dict[str, Any] = {}
        self.strategy: CMAES | None = None
        self.next_gen = 0
        self.first_by_hash: dict[str, str] = {}
        self.heldout_queue: deque[str] = deque()
        self.best_id: str | None = None
        self.num_workers = 1
        self.gen: _Generation | None = None
        self.pending: deque[int] = deque()  # indices of self.gen to submit
        self.waiting: dict[str, list[int]] = {}  # running eval id -> indices that are its cache hits
        self.in_flight: dict[str, float] = {}  # eval id -> monotonic submit time
        self.busy_s = 0.0
        self.watch = FailureWatch(1, active=False, where="")  # set up by run()

    # -- setup ----------------------------------------------------------------------------

    def _manifest(self, popsize: int) -> dict[str, Any]:
        config = normalized_config(self.config)
        config.pop("vllm", None)  # engine settings may change between sessions
        return {
            "config": config,
            "config_hash": config_hash(self.config),
            "seed": self.seed,
            "popsize": popsize,
            "sigma0": self.sigma0,
            "penalty": self.penalty,
            "num_layers": self.genome.num_layers,
            "dimension": self.genome.dimension,
            "max_fevals": self.max_fevals,
            "versions": self.versions,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def _new_strategy(self) -> CMAES:
        x0 = self.genome.initial_point(self.config.random_init, np.random.default_rng(self.seed))
        return CMAES(x0, self.sigma0, bounds=self.genome.bounds, popsize=self.popsize_, seed=self.seed,
                     scales=self.genome.scales)

    @property
    def _es(self) -> CMAES:
        assert self.strategy is not None, "the run is not open"
        return self.strategy

    def _save_state(self) -> None:
        state = {"format": STATE_FORMAT, "next_generation": self.next_gen, "es": self._es.state()}
        self.storage.save_search_state(pickle.dumps(state))

    def _resolve_popsize(self, num_workers: int | None) -> int | None:
        """The run's popsize: forced, else the stored run's, else the default for the workers
        (None when that is still unknown: ``num_workers`` None)."""
        stored = self.storage.read_manifest()
        if self.popsize is not None:
            return self.popsize
        if stored is not None and "popsize" in stored:
            return int(stored["popsize"])
        return None if num_workers is None else default_popsize(self.genome.dimension, num_workers)

    def check_stored_run(self) -> None:
        """Refuse, before any worker starts, a run directory this run cannot continue (other
        config, seed or search settings; a damaged manifest, ledger or search state).  Writes
        nothing."""
        popsize = self._resolve_popsize(None)
        if popsize is not None:
            self.storage.check_resumable(self._manifest(popsize), RESUME_KEYS)
        self.storage.load_evaluations(repair=False)
        blob = self.storage.load_search_state()
        if blob is not None:
            self._load_state(blob)

    def _open(self, num_workers: int) -> None:
        popsize = self._resolve_popsize(num_workers)
        assert popsize is not None
        self.popsize_ = popsize
        self.manifest = self.storage.open_run(self._manifest(self.popsize_), RESUME_KEYS)
        ledger = self.storage.load_evaluations()
        self.records = {r["eval_id"]: r for r in ledger}
        blob = self.storage.load_search_state()
        if blob is None:
            if ledger:
                raise StorageError(f"{self.storage.path}: ledger without search state; use a new --storage-path")
            self.next_gen = 0
            self.strategy = self._new_strategy()
            self._save_state()
        else:
            self._load_state(blob)
        # Replay the told generations: fitness cache, incumbent and the held-out queue.
        self.first_by_hash = {}
        self.heldout_queue = deque()
        self.best_id = None
        for g in range(self.next_gen):
            ids = [eval_id(g, i) for i in range(self.popsize_)]
            missing = [i for i in ids if i not in self.records]
            if missing:
                raise StorageError(f"{self.storage.path}: told generation {g} lacks ledger record {missing[0]}")
            for one in ids:
                rec = self.records[one]
                if rec.get("cached_from") is None:
                    self.first_by_hash.setdefault(rec["recipe_hash"], one)
            self._after_tell(ids)

    def _load_state(self, blob: bytes) -> None:
        where = self.storage.path / "search_state.pkl"
        try:
            state = pickle.loads(blob)
            fmt = state.get("format") if isinstance(state, dict) else None
            if fmt == STATE_FORMAT:
                self.next_gen = int(state["next_generation"])
                self.strategy = CMAES.from_state(state["es"])
                return
            problem = f"format {fmt!r} is not {STATE_FORMAT}"
        except Exception as exc:  # truncated or foreign bytes: any unpickling error
            problem = f"unreadable ({type(exc).__name__})"
        raise StorageError(f"{where}: the search state is damaged ({problem}); it is replaced atomically, so "
                           "something else changed it: restore it from a backup or start a new --storage-path")

    # -- bookkeeping ----------------------------------------------------------------------

    def _after_tell(self, ids: list[str]) -> bool:
        """Update the incumbent from a told generation; queue its held-out job. True if improved."""
        ok = [self.records[i] for i in ids if self.records[i]["status"] == "ok"]
        if not ok:
            return False
        gen_best = max(ok, key=lambda r: (r["fitness"], -r["index"]))
        if self.best_id is not None and gen_best["fitness"] <= self.records[self.best_id]["fitness"]:
            return False
        self.best_id = gen_best["eval_id"]
        if self.config.held_out and f"{self.best_id}/{HELD_OUT}" not in self.records:
            self.heldout_queue.append(self.best_id)
        return True

    def _append(self, record: dict[str, Any]) -> None:
        self.storage.append_evaluation(record)
        self.records[record["eval_id"]] = record
        for observer in self.observers:
            observer.on_record(record)

    def _train_record(self, gen: _Generation, i: int, result: Result | None, source: dict[str, Any] | None,
                      submitted: float | None) -> dict[str, Any]:
        record: dict[str, Any] = {
            "eval_id": gen.ids[i],
            "kind": TRAIN,
            "generation": gen.number,
            "index": i,
            "x": [float(v) for v in gen.points[i]],
            "recipe_hash": gen.hashes[i],
        }
        if source is not None:  # fitness cache hit
            for key in ("status", "reason", "scores", "fitness"):
                record[key] = source[key]
            record["cached_from"] = source["eval_id"]
            record["worker"] = None
            record["timings"] = {}
            return record
        assert result is not None
        record.update(self._scored(result, self.config.tasks, submitted))
        record["cached_from"] = None
        return record

    def _scored(self, result: Result, tasks: Sequence[TaskConfig], submitted: float | None) -> dict[str, Any]:
        status, reason, fitness = result.status, result.reason, self.penalty
        if status == "ok":
            try:
                fitness = weighted_fitness(tasks, result.scores)
            except ValueError as exc:
                status, reason = "failed", str(exc)
        elif status != "failed":
            status, reason = "failed", f"unknown result status {result.status!r}: {result.reason}"
        else:
            reason = reason or "evaluation failed (no reason given)"
        timings = {k: float(v) for k, v in result.timings.items() if isinstance(v, (int, float))}
        if submitted is not None:
            timings["wall_s"] = time.monotonic() - submitted
        timings["done_unix"] = time.time()  # when the driver got it: throughput, gaps, W&B time axis
        scores = json_scores(result.scores or {})
        return {"status": status, "reason": reason if status == "failed" else None, "scores": scores,
                "fitness": float(fitness), "worker": result.worker, "timings": timings}

    # -- the loop -------------------------------------------------------------------------

    def _ask(self) -> None:
        g = self.next_gen
        points = self._es.ask()
        recipes = [self.genome.decode(x) for x in points]
        gen = _Generation(g, points, recipes, [recipe_hash(r) for r in recipes],
                          [eval_id(g, i) for i in range(len(points))], [None] * len(points))
        self.gen = gen
        for i, one in enumerate(gen.ids):
            rec = self.records.get(one)
            if rec is not None:  # evaluated before a kill: take it from the ledger
                if not np.array_equal(np.asarray(rec["x"], dtype=np.float64), np.asarray(points[i])):
                    raise StorageError(
                        f"{self.storage.path}: candidate {one} re-asked after resume differs from the ledger;"
                        " the search state does not belong to this ledger"
                    )
                if rec.get("cached_from") is None:
                    self.first_by_hash.setdefault(gen.hashes[i], one)
                gen.fitness[i] = rec["fitness"]
                continue
            source_id = self.first_by_hash.get(gen.hashes[i])
            if source_id is None:
                self.first_by_hash[gen.hashes[i]] = one
                self.pending.append(i)
            elif source_id in self.records:
                self._resolve_cached(i, self.records[source_id])
            else:
                self.waiting.setdefault(source_id, []).append(i)

    def _resolve_cached(self, i: int, source: dict[str, Any]) -> None:
        assert self.gen is not None
        record = self._train_record(self.gen, i, None, source, None)
        self._append(record)
        self.gen.fitness[i] = record["fitness"]

    def _should_stop(self) -> str | None:
        if self.next_gen * self.popsize_ >= self.max_fevals:
            return f"max_fevals {self.max_fevals} reached"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "timeout reached"
        stop = self._es.stop()
        return f"cma stop: {stop}" if stop else None

    def _fill(self, pool: EvaluationPool) -> None:
        """Refill free worker slots: this generation's candidates first, then held-out jobs."""
        while len(self.in_flight) < self.num_workers and (self.pending or self.heldout_queue):
            if self.pending:
                assert self.gen is not None
                i = self.pending.popleft()
                job_id, recipe, task_set = self.gen.ids[i], self.gen.recipes[i], TRAIN
            else:
                train_id = self.heldout_queue.popleft()
                rec = self.records[train_id]
                job_id, task_set = f"{train_id}/{HELD_OUT}", HELD_OUT
                recipe = self.genome.decode(rec["x"])
            self.in_flight[job_id] = time.monotonic()
            pool.submit(job_id, recipe, task_set)

    def _receive(self, result: Result) -> None:
        submitted = self.in_flight.pop(result.eval_id, None)
        if submitted is None:
            raise RuntimeError(f"evaluation pool returned unknown or duplicate eval id {result.eval_id!r}")
        self.busy_s += time.monotonic() - submitted
        if result.eval_id.endswith(f"/{HELD_OUT}"):
            train_id = result.eval_id[: -len(HELD_OUT) - 1]
            record = {"eval_id": result.eval_id, "kind": HELD_OUT, "of": train_id,
                      "recipe_hash": self.records[train_id]["recipe_hash"]}
            record.update(self._scored(result, self.config.held_out, submitted))
            self._append(record)
            if train_id == self.best_id:
                self._write_best()  # provenance gains the held-out scores
            return
        assert self.gen is not None
        i = self.gen.ids.index(result.eval_id)
        record = self._train_record(self.gen, i, result, None, submitted)
        self._append(record)
        self.gen.fitness[i] = record["fitness"]
        for j in self.waiting.pop(result.eval_id, []):
            self._resolve_cached(j, record)
        self.watch.observe(record)

    def _tell(self) -> None:
        gen = self.gen
        assert gen is not None
        self._es.tell(gen.points, [float(f) for f in gen.fitness if f is not None])
        self.next_gen = gen.number + 1
        self._save_state()
        self.gen = None
        for observer in self.observers:
            observer.on_generation(gen.number, [self.records[i] for i in gen.ids], self._es.sigma)
        if self._after_tell(gen.ids):
            path = self._write_best()
            assert self.best_id is not None
            best = self.records[self.best_id]
            for observer in self.observers:
                observer.on_new_best(best, self.genome.decode(best["x"]), path)

    def run(self, pool: EvaluationPool) -> SearchOutcome:
        """Search until the budget or pycma's stop criteria; return the outcome.

        Raises whatever the pool raises; the storage then holds everything needed to resume.
        """
        self.num_workers = max(int(pool.num_workers), 1)
        self._open(self.num_workers)
        self.gen = None
        self.pending = deque()
        self.waiting = {}
        self.in_flight = {}
        self.busy_s = 0.0
        succeeded = any(r["kind"] == TRAIN and r["status"] == "ok" for r in self.records.values())
        # Enough distinct candidates that one shared reason is the setup's, few enough not to
        # spend a generation on it.
        self.watch = FailureWatch(min(self.popsize_, max(4, self.num_workers)), active=not succeeded,
                                  where=str(self.storage.ledger_path))
        for observer in self.observers:
            observer.on_start(self)
        started = time.monotonic()
        stop_reason = self._should_stop()
        while True:
            if self.gen is None and stop_reason is None:
                self._ask()
            if self.gen is not None and all(f is not None for f in self.gen.fitness):
                self._tell()
                stop_reason = self._should_stop()
                continue
            self._fill(pool)
            if not self.in_flight:
                break  # budget spent, generation told, held-out queue drained
            for result in pool.wait_any():
                self._receive(result)
        wall = max(time.monotonic() - started, 1e-9)
        outcome = self._outcome(stop_reason or "", self.busy_s / (wall * self.num_workers))
        self._write_best()
        return outcome

    # -- results --------------------------------------------------------------------------

    def _outcome(self, stop_reason: str, busy: float) -> SearchOutcome:
        train = [r for r in self.records.values() if r["kind"] == TRAIN]
        best = self.records.get(self.best_id) if self.best_id else None
        return SearchOutcome(
            best=best,
            best_recipe=self.genome.decode(best["x"]) if best else None,
            best_held_out=self.records.get(f"{self.best_id}/{HELD_OUT}") if best else None,
            generations=self.next_gen,
            candidates=self.next_gen * self.popsize_,
            evaluations=sum(1 for r in train if r.get("cached_from") is None),
            held_out_evaluations=sum(1 for r in self.records.values() if r["kind"] == HELD_OUT),
            stop_reason=stop_reason,
            busy_fraction=min(busy, 1.0),
        )

    def _write_best(self) -> Any:
        """(Re)write best_config.yaml for the incumbent, with provenance comments; its path."""
        if self.best_id is None:
            return None
        best = self.records[self.best_id]
        recipe = self.genome.decode(best["x"])
        outcome = self._outcome("", 0.0)
        provenance = best_provenance(
            best, self.records.get(f"{self.best_id}/{HELD_OUT}"), config=self.config, seed=self.seed,
            config_hash=self.manifest["config_hash"],
            evaluations_used={"candidates": outcome.candidates, "train": outcome.evaluations,
                              "held_out": outcome.held_out_evaluations},
            search={"popsize": self.popsize_, "sigma0": self.sigma0, "max_fevals": self.max_fevals,
                    "generations": outcome.generations},
            versions=self.versions)
        recipe_yaml = yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)
        return self.storage.write_best_config(recipe_yaml, provenance)
