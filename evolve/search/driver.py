"""The search driver: asks candidates, keeps every worker fed, tells results, survives kills.

The state of a search is its ledger: every ask, every result, in the order they happened
(:mod:`.records`).  :class:`~evolve.search.trajectory.Trajectory` turns those events into the
optimizer's state, the incumbent and the held-out queue; the driver feeds it the same events
live (from the pool) and, when a run resumes, from the stored ledger: a fresh seeded optimizer
replays the recorded asks (each re-asked point must equal the recorded one) and tells in the
recorded order, so the resumed run is in exactly the state the killed one was in.  Nothing is
unpickled, ever.

Scheduling (see the trajectory module for what each schedule tells when):

- ``async`` (default): a freed worker slot gets held-out work first (one job per new
  incumbent), then a re-issued candidate (asked before a kill, never answered), then a fresh one:
  no worker waits for a generation's slowest candidate.  Exactly ``max_fevals`` candidates are
  asked (cache hits included), every one is told or counted for the incumbent.
- ``sync`` (``--sync``): generation g+1 is asked only after generation g is told (a timing-
  independent trajectory); generations are asked while fewer than ``max_fevals`` candidates
  were told, so the last one may pass it.
- Fitness cache: a candidate whose recipe hash equals an earlier candidate's is not evaluated:
  it is ledgered with ``cached_from`` and that result (waiting for it if it is still running).
- The run ends when nothing more may be asked (budget, pycma's stop criteria, ``deadline``)
  and every job is back; results never told (async's last batch) then count for the incumbent.
  Meanwhile, once nothing is left to hand out, idle workers are released (``release_idle``:
  their GPUs go back to the cluster; one is kept while jobs still run), and the busy fraction
  is busy worker-seconds over the worker-seconds actually held.

Crash safety (kill -9 at any instant): an ask record is appended (whole line, fsync) before its
candidate is submitted, a result before anything depends on it; ``best_config.yaml`` is
rewritten atomically.  On resume, candidates asked but never answered are submitted again;
nothing in the ledger is evaluated twice.  A sync run's final ledger (minus worker ids, timings
and line order) equals an uninterrupted run's.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import yaml

from evolve.baselines import baseline_records
from evolve.config import EvolveConfig, config_hash, fewshot_seed_of, racing_confidence_of
from evolve.genome import Genome
from evolve.protocols import HELD_OUT, TRAIN, EvaluationPool, Result, SearchObserver
from evolve.racing import DEFAULT_FRACTIONS, DEFAULT_Z, RaceJob, decode_values, fitness_interval
from evolve.search.compat import LEGACY_DEFAULTS, RESUME_KEYS, manifest_config, stored_value
from evolve.search.design import default_design_size
from evolve.search.failures import FailureWatch
from evolve.search.fitness import default_penalty
from evolve.search.mo_strategies import DEFAULT_MO_STRATEGY, MO_DESIGN_STRATEGIES
from evolve.search.objectives import Objectives
from evolve.search.outcome import SearchOutcome
from evolve.search.provenance import best_provenance, package_versions
from evolve.search.race_jobs import race_job
from evolve.search.records import ASK, ask_record, cached_record, held_out_record, train_record
from evolve.search.replay import replay_ledger
from evolve.search.strategies import DEFAULT_STRATEGY, DESIGN_STRATEGIES, make_strategy
from evolve.search.trajectory import ASYNC, SYNC, Candidate, Trajectory, TrajectoryError
from evolve.storage import RunStorage, StorageError
from merge_core.errors import RecipeError

MIN_ASYNC_POPSIZE = 3  # pycma tells at least 3 points (mirrors, which make up the rest in sync, are off)


@dataclass(frozen=True)
class RaceSettings:
    """Racing on documents (:mod:`evolve.racing`): the confidence ``z`` and the check points."""

    z: float = DEFAULT_Z
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    level: str = "incumbent"  # what a raced candidate must be able to reach: "incumbent" or "cut"


def default_popsize(dimension: int, num_workers: int = 1) -> int:
    """pycma's default population size rounded up to a multiple of ``num_workers``."""
    base = 4 + int(3 * math.log(max(dimension, 1)))
    workers = max(num_workers, 1)
    return -(-base // workers) * workers


def eval_id(generation: int, index: int) -> str:
    """The ledger id of candidate ``index`` of ``generation`` (sync schedule)."""
    return f"g{generation:05d}-{index:04d}"


class SearchDriver:
    """Owns the ask/evaluate/tell loop for one run directory (see the module docstring).

    ``genome`` maps vectors to recipes; ``storage`` is the run directory (resumed if it holds a
    run with the same config, seed, popsize, sigma0, penalty and schedule; ``max_fevals`` may
    grow); ``sigma0`` is CMA-ES's initial step (mergekit-evolve's default 1/6, per unit of a
    weight's range); ``popsize`` None = :func:`default_popsize` for the pool's workers (then kept
    on resume); ``schedule`` "async", "sync", or None (the stored run's, else async);
    ``penalty`` is the fitness of a failed candidate (None = :func:`default_penalty`);
    ``versions`` overrides the package versions recorded for provenance; ``deadline`` is a
    ``time.monotonic()`` instant after which nothing new is asked.
    """

    def __init__(self, genome: Genome, storage: RunStorage, config: EvolveConfig, *, sigma0: float = 1 / 6,
                 popsize: int | None = None, seed: int = 0, max_fevals: int = 100, penalty: float | None = None,
                 versions: dict[str, str] | None = None, observers: Sequence[SearchObserver] = (),
                 deadline: float | None = None, schedule: str | None = None,
                 racing: RaceSettings | None = None, strategy: str | None = None) -> None:
        if sigma0 <= 0 or not math.isfinite(sigma0):
            raise ValueError(f"sigma0 must be a positive number, got {sigma0}")
        if popsize is not None and popsize < 2:
            raise ValueError(f"popsize must be >= 2, got {popsize}")
        if max_fevals < 1:
            raise ValueError(f"max_fevals must be >= 1, got {max_fevals}")
        if schedule not in (None, SYNC, ASYNC):
            raise ValueError(f"schedule must be 'sync' or 'async', got {schedule!r}")
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
        self.schedule = schedule
        self.racing = racing
        self.strategy_name = strategy
        self.objectives = Objectives(config)
        self._reference: tuple[str, dict[str, list[float]]] | None = None  # decoded per-doc values
        # Run state, filled by run() from the stored ledger, then by the loop.
        self.records: dict[str, dict[str, Any]] = {}  # train and held-out records by id
        self.manifest: dict[str, Any] = {}
        self.traj: Trajectory | None = None
        self.num_workers = 1
        self.in_flight: dict[str, float] = {}  # eval id -> monotonic submit time
        self.to_submit: deque[Candidate] = deque()
        self.waiting: dict[str, list[Candidate]] = {}  # running source id -> its cache hits
        self.busy_s = 0.0
        self.held_s = 0.0  # worker-seconds held this session (idle workers released at the end)
        self.last_event = time.monotonic()
        self.draining = False  # nothing left to hand out: idle workers are released
        self.started = time.monotonic()
        self.finished_untold = False
        self.watch = FailureWatch(1, active=False, where="")

    # -- settings -------------------------------------------------------------------------

    def _settings(self, num_workers: int | None) -> tuple[int | None, str]:
        """(popsize, schedule): forced, else the stored run's, else the defaults (popsize None
        while the pool's size is unknown)."""
        stored = self.storage.read_manifest()
        if stored is not None:
            stored = {**LEGACY_DEFAULTS, **stored}
        schedule = self.schedule or (stored["schedule"] if stored else ASYNC)
        if self.popsize is not None:
            popsize: int | None = self.popsize
        elif stored is not None and "popsize" in stored:
            popsize = int(stored["popsize"])
        else:
            popsize = None if num_workers is None else default_popsize(self.genome.dimension, num_workers)
        if schedule == ASYNC and popsize is not None and popsize < MIN_ASYNC_POPSIZE:
            raise RecipeError("--force-population-size", f"{popsize} is too small for the async schedule (pycma "
                              f"updates from at least {MIN_ASYNC_POPSIZE} results); use >= {MIN_ASYNC_POPSIZE} "
                              "or --sync")
        return popsize, schedule

    def _legacy(self) -> dict[str, Any]:
        """What a manifest of an earlier version means by the keys it lacks."""
        return {**LEGACY_DEFAULTS, "genome_box": self.genome.legacy_box()}

    def _manifest(self, popsize: int, schedule: str) -> dict[str, Any]:
        stored = self.storage.read_manifest()
        config = manifest_config(self.config, stored)
        config.pop("vllm", None)  # engine settings may change between sessions
        return {"config": config, "config_hash": config_hash(self.config), "seed": self.seed, "popsize": popsize,
                "sigma0": self.sigma0, "penalty": self.penalty, "num_layers": self.genome.num_layers,
                "dimension": self.genome.dimension, "max_fevals": self.max_fevals, "schedule": schedule,
                "genome_box": self.genome.box_json(), "strategy": self._strategy_name(),
                "initial_design": self._design_size(popsize),
                "racing_confidence": racing_confidence_of(self.config, stored),
                "fewshot_seed": fewshot_seed_of(self.config, stored),
                "versions": self.versions, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def _strategy_name(self) -> str:
        """Forced (``strategy``: the app passes the config's ``search.strategy``), else the stored
        run's, else the default (of the objectives mode)."""
        if self.strategy_name is not None:
            return self.strategy_name
        default = DEFAULT_MO_STRATEGY if self.objectives.pareto else DEFAULT_STRATEGY
        return str(stored_value(self.storage.read_manifest(), "strategy", default))

    def _design_size(self, popsize: int) -> int:
        """Evaluations of the space-filling start: the config's, else the stored run's, else the
        default (:func:`default_design_size` for CMA-ES on a genome that takes one by default)."""
        if self.config.search is not None and self.config.search.initial_design is not None:
            return self.config.search.initial_design
        use = self._strategy_name() in DESIGN_STRATEGIES + MO_DESIGN_STRATEGIES and self.genome.design_by_default
        return int(stored_value(self.storage.read_manifest(), "initial_design",
                                default_design_size(popsize) if use else 0))

    def _trajectory(self, popsize: int, schedule: str) -> Trajectory:
        x0 = self.genome.initial_point(self.config.random_init, np.random.default_rng(self.seed))
        strategy = make_strategy(self._strategy_name(), x0, self.sigma0, bounds=self.genome.bounds, popsize=popsize,
                                 seed=self.seed, scales=self.genome.scales, mirrors=schedule == SYNC,
                                 design_size=self._design_size(popsize), design_space=self.genome,
                                 objectives=len(self.config.tasks) if self.objectives.pareto else 0)
        return Trajectory(strategy, self.genome, schedule=schedule, max_fevals=self.max_fevals,
                          held_out=bool(self.config.held_out), objectives=self.objectives)

    def check_stored_run(self) -> SearchOutcome | None:
        """Refuse, before any worker starts, a run directory this run cannot continue (other
        settings; a damaged manifest or ledger; a ledger that does not replay).  Writes nothing.

        Returns the stored run's outcome when it is complete (nothing left to ask, to evaluate or
        to score on the held-out tasks: running it again would do nothing), else None.
        """
        popsize, schedule = self._settings(None)
        if popsize is None:
            return None  # a new run
        self.storage.check_resumable(self._manifest(popsize, schedule), RESUME_KEYS, self._legacy())
        ledger = self.storage.load_evaluations(repair=False)
        traj = self._trajectory(popsize, schedule)
        self._replay(traj, ledger)
        if not traj.exhausted() or len(traj.results) < len(traj.candidates):
            return None
        traj.consider(traj.untold())  # as the end of run() does
        if traj.heldout_queue:
            return None
        self.traj, self.records = traj, {r["eval_id"]: r for r in ledger if r.get("kind") != ASK}
        return self._outcome(self._stop_reason(), 0.0)

    # -- replay ---------------------------------------------------------------------------

    def _replay(self, traj: Trajectory, ledger: list[dict[str, Any]]) -> None:
        """Feed the stored events to ``traj`` (:func:`evolve.search.replay.replay_ledger`)."""
        try:
            replay_ledger(traj, ledger)
        except TrajectoryError as exc:
            raise StorageError(f"{self.storage.path}: cannot resume: {exc}; use a new --storage-path") from None

    # -- the loop -------------------------------------------------------------------------

    @property
    def _traj(self) -> Trajectory:
        assert self.traj is not None, "the run is not open"
        return self.traj

    def _append(self, record: dict[str, Any]) -> None:
        self.storage.append_evaluation(record)
        if record["kind"] == ASK:
            return
        self.records[record["eval_id"]] = record
        for observer in self.observers:
            observer.on_record(record)

    def _dispatch(self, cand: Candidate) -> None:
        """Route a candidate with no result: evaluate it, take a finished result, or wait for one."""
        traj = self._traj
        source = traj.source_of(cand)
        if source == cand.eval_id:
            self.to_submit.append(cand)
        elif source in traj.results:
            self._resolve_cached(cand, traj.results[source])
        else:
            self.waiting.setdefault(source, []).append(cand)

    def _resolve_cached(self, cand: Candidate, source: dict[str, Any]) -> None:
        record = cached_record(cand, self._traj.position(cand), source)
        self._append(record)
        self._observe(record)

    def _observe(self, record: dict[str, Any]) -> None:
        traj = self._traj
        told = traj.observe(record)
        if told is None:
            return
        for observer in self.observers:
            observer.on_generation(traj.tells - 1, [self.records[i] for i in told], traj.strategy.sigma)
        if traj.consider(told):
            self._announce_best()

    def _announce_best(self) -> None:
        path = self._write_best()
        best = self.records[self._traj.best_id]  # type: ignore[index]
        for observer in self.observers:
            observer.on_new_best(best, self.genome.decode(best["x"]), path)

    def _past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def _may_ask(self) -> bool:
        return self._traj.can_ask() and not self._past_deadline()

    def _fill(self, pool: EvaluationPool) -> None:
        """Refill free worker slots: held-out jobs, re-issued candidates, then fresh asks."""
        traj = self._traj
        race = None
        while len(self.in_flight) < self.num_workers:
            if traj.heldout_queue:
                train_id = traj.heldout_queue.popleft()
                job_id, task_set = traj.held_out_id(train_id), HELD_OUT
                recipe = self.genome.decode(self.records[train_id]["x"])
            elif self.to_submit:
                cand = self.to_submit.popleft()
                job_id, recipe, task_set = cand.eval_id, cand.recipe, TRAIN
                race = self._race_job()
            elif self._may_ask():
                for cand in traj.ask():
                    self._append(ask_record(cand))
                    self._dispatch(cand)
                continue
            else:
                if self._traj.exhausted() or self._past_deadline():
                    self._drain(pool)
                return
            self._account()
            self.in_flight[job_id] = time.monotonic()
            if task_set == TRAIN and race is not None:
                pool.submit(job_id, recipe, task_set, race)
            else:
                pool.submit(job_id, recipe, task_set)
            race = None

    def _race_job(self) -> RaceJob | None:
        """The race a train candidate runs now (:func:`evolve.search.race_jobs.race_job`)."""
        if self.racing is None:
            return None
        job, self._reference = race_job(self.racing, self._traj, self.records, self.config, self.objectives,
                                        self._reference)
        return job

    def _held_workers(self) -> int:
        if not self.draining:
            return self.num_workers
        # Idle workers are released while draining; one idle one is kept while jobs still run
        # (a late new best's held-out job then needs no fresh worker).
        return min(self.num_workers, len(self.in_flight) + (1 if self.in_flight else 0))

    def _account(self) -> None:
        """Add the worker-seconds held since the last change of the in-flight set."""
        now = time.monotonic()
        self.held_s += self._held_workers() * (now - self.last_event)
        self.last_event = now

    def _drain(self, pool: EvaluationPool) -> None:
        """Nothing will be asked any more: let idle workers go (see ``release_idle``)."""
        self._account()
        self.draining = True
        release = getattr(pool, "release_idle", None)
        if release is not None:
            release(keep=1 if self.in_flight else 0)

    def _receive(self, result: Result) -> None:
        self._account()
        submitted = self.in_flight.pop(result.eval_id, None)
        if submitted is None:
            raise RuntimeError(f"evaluation pool returned unknown or duplicate eval id {result.eval_id!r}")
        self.busy_s += time.monotonic() - submitted
        traj = self._traj
        if result.eval_id.endswith(f"/{HELD_OUT}"):
            train = self.records[result.eval_id[: -len(HELD_OUT) - 1]]
            self._append(held_out_record(train, result, self.config.held_out, self.penalty, submitted))
            traj.held_out_scored(train["eval_id"])
            if train["eval_id"] == traj.best_id:
                self._write_best()  # provenance gains the held-out scores
            return
        cand = traj.candidates[result.eval_id]
        record = train_record(cand, traj.position(cand), result, self.config.tasks, self.penalty, submitted)
        self._append(record)
        self._observe(record)
        for waiter in self.waiting.pop(cand.eval_id, []):
            self._resolve_cached(waiter, record)
        self.watch.observe(record)

    def _finish_untold(self) -> bool:
        """Once nothing else can happen: count results never told for the incumbent (True when
        that queued held-out work)."""
        if self.finished_untold:
            return False
        self.finished_untold = True
        if self._traj.consider(self._traj.untold()):
            self._announce_best()
        if self.objectives.pareto:  # every front member is re-scored on the held-out tasks
            for train_id in self._traj.front_ids():
                self._traj.queue_held_out(train_id)
        return bool(self._traj.heldout_queue)

    def busy_fraction(self) -> float:
        """This session's busy worker-seconds over the worker-seconds it held so far (workers
        held from the start; once nothing is left to hand out, idle ones are released)."""
        now = time.monotonic()
        held = self.held_s + self._held_workers() * (now - self.last_event)
        running = sum(now - t for t in self.in_flight.values())
        return min((self.busy_s + running) / held, 1.0) if held > 0 else 0.0

    def run(self, pool: EvaluationPool) -> SearchOutcome:
        """Search until the budget, pycma's stop criteria or the deadline; return the outcome.

        Raises whatever the pool raises; the storage then holds everything needed to resume.
        """
        self.num_workers = max(int(pool.num_workers), 1)
        popsize, schedule = self._settings(self.num_workers)
        assert popsize is not None
        self.manifest = self.storage.open_run(self._manifest(popsize, schedule), RESUME_KEYS, self._legacy())
        ledger = self.storage.load_evaluations()
        self.records = {r["eval_id"]: r for r in ledger if r.get("kind") != ASK}
        self.traj = self._trajectory(popsize, schedule)
        self._replay(self.traj, ledger)
        self.in_flight, self.to_submit, self.waiting, self.busy_s = {}, deque(), {}, 0.0
        self.finished_untold = False
        for cand in list(self.traj.candidates.values()):
            if cand.eval_id not in self.traj.results:
                self._dispatch(cand)  # asked before a kill, never answered: issued again
        succeeded = any(r["kind"] == TRAIN and r["status"] == "ok" for r in self.records.values())
        # Enough distinct candidates that one shared reason is the setup's, few enough not to
        # spend a generation on it.
        self.watch = FailureWatch(min(popsize, max(4, self.num_workers)), active=not succeeded,
                                  where=str(self.storage.ledger_path))
        for observer in self.observers:
            observer.on_start(self)
        self.started = self.last_event = time.monotonic()
        self.held_s, self.draining = 0.0, False
        while True:
            self._fill(pool)
            if not self.in_flight:
                if self._finish_untold():
                    continue
                break
            for result in pool.wait_any():
                self._receive(result)
                self._fill(pool)
        outcome = self._outcome(self._stop_reason(), self.busy_fraction())
        self._write_best()
        if self.objectives.pareto:
            from evolve.pareto_export import write_pareto  # (it imports this package: not at module level)

            write_pareto(self.storage, self.objectives, self.genome, self.records.values(),
                         run={"seed": self.seed, "config_hash": self.manifest["config_hash"],
                              "strategy": self._strategy_name(), "versions": self.versions})
        return outcome

    def _stop_reason(self) -> str:
        traj = self._traj
        if traj.stop_reason is not None:
            return traj.stop_reason
        if traj.can_ask():
            return "timeout reached"
        return f"max_fevals {self.max_fevals} reached"

    # -- results --------------------------------------------------------------------------

    def _outcome(self, stop_reason: str, busy: float) -> SearchOutcome:
        traj = self._traj
        train = [r for r in self.records.values() if r["kind"] == TRAIN]
        best = self.records.get(traj.best_id) if traj.best_id else None
        return SearchOutcome(
            best=best,
            best_recipe=self.genome.decode(best["x"]) if best else None,
            best_held_out=self.records.get(traj.held_out_id(traj.best_id)) if best and traj.best_id else None,
            generations=traj.tells,
            candidates=len(train),
            evaluations=sum(1 for r in train if r.get("cached_from") is None),
            held_out_evaluations=sum(1 for r in self.records.values() if r["kind"] == HELD_OUT),
            stop_reason=stop_reason,
            busy_fraction=busy,
        )

    def _write_best(self) -> Any:
        """(Re)write best_config.yaml for the incumbent, with provenance comments; its path."""
        traj = self._traj
        if traj.best_id is None:
            return None
        best = self.records[traj.best_id]
        recipe = self.genome.decode(best["x"])
        outcome = self._outcome("", 0.0)
        provenance = best_provenance(
            best, self.records.get(traj.held_out_id(traj.best_id)), config=self.config, seed=self.seed,
            config_hash=self.manifest["config_hash"], fewshot_seed=self.manifest.get("fewshot_seed"),
            evaluations_used={"candidates": outcome.candidates, "train": outcome.evaluations,
                              "held_out": outcome.held_out_evaluations},
            search={"popsize": traj.popsize, "sigma0": self.sigma0, "max_fevals": self.max_fevals,
                    "generations": outcome.generations, "schedule": traj.schedule,
                    "strategy": self._strategy_name(), "initial_design": self.manifest.get("initial_design", 0),
                    "racing": self.racing is not None, "objectives": self.objectives.mode},
            versions=self.versions, baselines=baseline_records(self.records.values()))  # scored before run()
        if self.objectives.constrained:  # with floors: whether the best meets them (it does if any candidate does)
            provenance["feasible"] = self.objectives.feasible(best)
            provenance["violation"] = self.objectives.violation_of(best)
        if "per_doc" in best:  # scored per document (racing): how sure the best's fitness is
            weights = {t.name: float(t.weight) for t in self.config.tasks}
            values = {t: decode_values(v) for t, v in best["per_doc"].items()}
            if set(values) == set(weights):
                provenance["train_fitness_ci95"] = list(fitness_interval(values, weights))
        recipe_yaml = yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)
        return self.storage.write_best_config(recipe_yaml, provenance)
