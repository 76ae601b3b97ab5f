"""Baselines: the models a run starts from, scored once, so "better than my inputs?" has an answer.

At the start of a run (after the preflight, before the search; :func:`score_baselines`), each
input model (the base model and every genome model, each as a passthrough recipe: that model
itself, rounded to the genome's dtype like every candidate) and the equal-weights merge (the
genome's initial point) are scored once on the train and on the held-out tasks through the run's
workers.  Each score is one ledger record of kind ``baseline``::

    {"kind": "baseline", "eval_id": "baseline/spatial" | "baseline/spatial/held_out",
     "name": "spatial", "model": "zoo/spatial", "role": "base" | "model" | "equal_merge",
     "task_set": "train" | "held_out", "recipe_hash", "tasks", "status", "reason", "scores",
     "fitness", "worker", "node", "timings"}

The preflight's scores of the starting model are reused for its baseline (it is not scored
twice), unless the run merges vocabularies (the preflight scores it in the run's vocabulary,
as candidates are scored; its baseline, in its own).  A stored baseline is never scored again (a resumed run reuses it), unless it failed for
a passing reason (out of memory, a dead worker) or no longer matches (another recipe or task
list).  The search ignores these records; the progress line, W&B, ``best_config`` provenance
and the reports read them with the functions below (standard library only: ``report`` imports
this module without the search's dependencies).

With layer stacking the sources are the parents and the search's start (every slot used, the
first source's layers in order, :mod:`evolve.stacking_genome`) takes the equal merge's place, as
``start_stack``.

"Parents" are the input models (not the equal merge or the start stack).  The best's gain over
the best parent is its train fitness minus the highest train fitness of a parent; the held-out
gain compares with the highest held-out fitness of a parent.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from evolve.protocols import HELD_OUT, TRAIN

__all__ = [
    "BASELINE",
    "EQUAL_MERGE",
    "PARENT_ROLES",
    "START_ROLES",
    "START_STACK",
    "BaselineJob",
    "baseline_jobs",
    "baseline_provenance",
    "baseline_records",
    "baseline_summary",
    "best_parent",
    "parent_best_fitness",
    "score_baselines",
    "short_name",
    "start_label",
    "task_list",
]

BASELINE = "baseline"
EQUAL_MERGE = "equal_merge"
START_STACK = "start_stack"  # layer stacking's start point, in the equal merge's place
START_ROLES = (EQUAL_MERGE, START_STACK)  # the search's start point: scored, never a parent
PARENT_ROLES = ("base", "model")
ROLE_ORDER = {"base": 0, "model": 1, EQUAL_MERGE: 2, START_STACK: 2}


def start_label(role: str) -> str:
    """How reports name a start-point baseline of ``role``."""
    return "start stack" if role == START_STACK else "equal merge"


@dataclass(frozen=True)
class BaselineJob:
    """One baseline to score: its short name, model reference (None for the equal merge), role
    and recipe."""

    name: str
    model: str | None
    role: str
    recipe: dict[str, Any]
    x: list[float] | None = None  # the genome vector (the equal merge only)

    def eval_id(self, task_set: str) -> str:
        """The ledger id of this baseline's score on ``task_set``."""
        return f"{BASELINE}/{self.name}" + ("" if task_set == TRAIN else f"/{task_set}")


def short_name(ref: str) -> str:
    """``zoo/spatial`` -> ``spatial``, ``org/name@rev`` -> ``name``, ``/a/b/`` -> ``b``."""
    tail = ref.split("@", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", tail) or "model"


def baseline_jobs(config: Any, models: Any, genome: Any) -> list[BaselineJob]:
    """The baselines of a run: the base model, every genome model (each once), the equal merge.

    ``models`` is :class:`evolve.preflight.CheckedModels`; ``genome`` the run's
    :class:`evolve.genome.Genome`.  Names are the models' folder names, made unique.
    """
    import numpy as np

    from evolve.preflight import model_recipe

    refs: list[tuple[str, str]] = []
    if config.genome is None:  # layer stacking: every source, as a whole model
        refs = [(ref, "model") for ref in genome.sources]
    else:
        if config.genome.base_model:
            refs.append((config.genome.base_model, "base"))
        for ref in config.genome.models:
            if ref not in (r for r, _ in refs):
                refs.append((ref, "model"))
    taken = {EQUAL_MERGE, START_STACK, HELD_OUT}
    jobs = []
    for ref, role in refs:
        name = short_name(ref)
        if name in taken:
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", ref.strip("/")) or name
        while name in taken:
            name += "_"
        taken.add(name)
        jobs.append(BaselineJob(name, ref, role, model_recipe(ref, models.num_layers, genome.dtype)))
    x0 = genome.initial_point(False, np.random.default_rng(0))
    start = EQUAL_MERGE if config.genome is not None else START_STACK
    jobs.append(BaselineJob(start, None, start, genome.decode(x0), x=x0))
    return jobs


def task_list(tasks: Iterable[Any]) -> list[dict[str, Any]]:
    """Tasks as recorded in the ledger and the provenance: name, metric, weight."""
    return [{"name": t.name, "metric": t.metric, "weight": t.weight} for t in tasks]


def _reusable(stored: dict[str, Any] | None, recipe_hash: str, tasks: list[dict[str, Any]]) -> bool:
    """Whether a stored baseline record stands (see the module docstring)."""
    from evolve.search.failures import is_transient

    if stored is None or stored.get("recipe_hash") != recipe_hash or stored.get("tasks") != tasks:
        return False
    return stored.get("status") == "ok" or not is_transient(stored.get("reason"))


def score_baselines(pool: Any, storage: Any, config: Any, models: Any, genome: Any,
                    preflight: dict[str, Any], *, quiet: bool = False) -> list[dict[str, Any]]:
    """Score the run's baselines (those not stored yet) through ``pool`` and append their records.

    ``storage``: the run's :class:`~evolve.storage.RunStorage` (its directory created and locked);
    ``preflight``: :func:`evolve.preflight.preflight_evaluation`'s results (reused for the
    starting model).  Returns every baseline record of the run (stored and new).  A failed
    baseline is recorded (with its reason) and the run goes on.
    """
    from evolve.genome import recipe_hash
    from evolve.search.fitness import default_penalty
    from evolve.search.records import scored

    sets = {TRAIN: list(config.tasks), HELD_OUT: list(config.held_out)}
    penalty = default_penalty(config.tasks)
    stored = {r["eval_id"]: r for r in baseline_records(storage.load_evaluations())}
    jobs: dict[str, tuple[BaselineJob, str, str]] = {}
    for job in baseline_jobs(config, models, genome):
        digest = recipe_hash(job.recipe)
        for task_set, tasks in sets.items():
            eval_id = job.eval_id(task_set)
            if tasks and not _reusable(stored.get(eval_id), digest, task_list(tasks)):
                jobs[eval_id] = (job, task_set, digest)

    shown = _InOrder(jobs, sets, stored, quiet)

    def record(eval_id: str, result: Any, submitted: float | None) -> None:
        job, task_set, digest = jobs[eval_id]
        rec = {"eval_id": eval_id, "kind": BASELINE, "name": job.name, "model": job.model, "role": job.role,
               "task_set": task_set, "recipe_hash": digest, "tasks": task_list(sets[task_set])}
        if job.x is not None:
            rec["x"] = [float(v) for v in job.x]
        rec.update(scored(result, sets[task_set], penalty, submitted))
        storage.append_evaluation(rec)
        stored[eval_id] = rec
        shown.recorded(eval_id)

    from evolve.preflight import preflight_recipe

    # The preflight scored the evaluated model as candidates are scored: the same as its
    # baseline unless the run merges vocabularies (a parent is scored in its own).
    scored_first = preflight_recipe(config, models, genome.dtype)
    submitted: dict[str, float] = {}
    for eval_id, (job, task_set, _) in jobs.items():
        reuse = preflight.get(task_set) if job.model == models.evaluated and job.recipe == scored_first else None
        if reuse is not None:
            record(eval_id, reuse, None)
        else:
            submitted[eval_id] = time.monotonic()
            pool.submit(eval_id, job.recipe, task_set)
    pending = set(submitted)
    while pending:
        for result in pool.wait_any():
            pending.discard(result.eval_id)
            record(result.eval_id, result, submitted[result.eval_id])
    records = list(stored.values())
    if not quiet and jobs:
        best = best_parent(baseline_summary(records))
        if best is not None:
            print(f"baselines: best parent {best['name']} {best['fitness']:.4f}", file=sys.stderr)
    return records


class _InOrder:
    """Prints one line per baseline scored now (train and held-out), in the jobs' order,
    whatever order the workers finish in: ``baseline: spatial (zoo/spatial) train 0.4250,
    held-out 0.4220``."""

    def __init__(self, jobs: dict[str, tuple[BaselineJob, str, str]], sets: dict[str, list[Any]],
                 stored: dict[str, dict[str, Any]], quiet: bool) -> None:
        self.stored, self.quiet = stored, quiet
        self.jobs = {job.name: job for job, _, _ in jobs.values()}  # in job order
        self.order = list(self.jobs)
        self.ids = {name: [i for i in (job.eval_id(s) for s, tasks in sets.items() if tasks) if i in jobs]
                    for name, job in self.jobs.items()}
        self.done: set[str] = set()
        self.next = 0

    def recorded(self, eval_id: str) -> None:
        """``eval_id``'s record is stored: print the lines now complete, in order."""
        self.done.add(eval_id)
        while not self.quiet and self.next < len(self.order):
            name = self.order[self.next]
            if not self.done.issuperset(self.ids[name]):
                return
            self.next += 1
            parts = []
            for i in self.ids[name]:
                rec = self.stored[i]
                what = "held-out" if rec["task_set"] == HELD_OUT else "train"
                parts.append(f"{what} {rec['fitness']:.4f}" if rec["status"] == "ok" else f"{what} failed: {rec['reason']}")
            job = self.jobs[name]
            label = name if job.model is None else f"{name} ({job.model})"
            print(f"baseline: {label} " + ", ".join(parts), file=sys.stderr)


# -- reading baselines off the ledger (light: report, observers, provenance) ---------------


def baseline_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The baseline records among ledger records, the latest per id, in ledger order."""
    latest: dict[str, dict[str, Any]] = {}
    for rec in records:
        if rec.get("kind") == BASELINE:
            latest.pop(rec["eval_id"], None)
            latest[rec["eval_id"]] = rec
    return list(latest.values())


def baseline_summary(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per baseline, parents (base first) then the equal merge.

    Each: ``name``, ``model``, ``role``, ``fitness`` / ``held_out_fitness`` (None unless scored
    successfully), ``scores`` / ``held_out_scores``, ``reason`` (of a failure, else None),
    ``note`` (how it was scored where not as usual, else None).
    """
    out: dict[str, dict[str, Any]] = {}
    for rec in baseline_records(records):
        entry = out.setdefault(rec["name"], {"name": rec["name"], "model": rec.get("model"), "role": rec.get("role"),
                                             "fitness": None, "held_out_fitness": None, "scores": {},
                                             "held_out_scores": {}, "reason": None, "note": None})
        entry["note"] = entry["note"] or rec.get("note")
        prefix = "held_out_" if rec.get("task_set") == HELD_OUT else ""
        if rec.get("status") == "ok":
            entry[f"{prefix}fitness"] = rec["fitness"]
            entry[f"{prefix}scores"] = rec.get("scores") or {}
        else:
            entry["reason"] = rec.get("reason")
    return sorted(out.values(), key=lambda e: ROLE_ORDER.get(e["role"], len(ROLE_ORDER)))


def best_parent(summary: list[dict[str, Any]], key: str = "fitness") -> dict[str, Any] | None:
    """The parent (input model) with the highest ``key`` (``fitness`` or ``held_out_fitness``)."""
    parents = [e for e in summary if e["role"] in PARENT_ROLES and e[key] is not None]
    return max(parents, key=lambda e: e[key]) if parents else None


def parent_best_fitness(records: Iterable[dict[str, Any]], key: str = "fitness") -> float | None:
    """The highest ``key`` of a parent among ledger ``records`` (None: no parent scored)."""
    best = best_parent(baseline_summary(records), key)
    return None if best is None else best[key]


def _gain(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else value - reference


def baseline_provenance(records: Iterable[dict[str, Any]], best_fitness: float | None,
                        held_out_fitness: float | None) -> dict[str, Any]:
    """The provenance fields of the baselines: each baseline's fitness, the best parents and
    the best's gains over them (None where something is not scored)."""
    summary = baseline_summary(records)
    train, held = best_parent(summary), best_parent(summary, "held_out_fitness")
    return {
        "baselines": [{"name": e["name"], "model": e["model"], "role": e["role"], "train_fitness": e["fitness"],
                       "held_out_fitness": e["held_out_fitness"]} for e in summary],
        "best_parent": None if train is None else train["name"],
        "gain_over_best_parent": _gain(best_fitness, None if train is None else train["fitness"]),
        "held_out_gain_over_best_parent": _gain(held_out_fitness, None if held is None else held["held_out_fitness"]),
    }
