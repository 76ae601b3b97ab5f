#!/usr/bin/env python
"""Worker utilisation at cluster scale, measured on a virtual clock: sync vs async schedules.

    python scripts/bench_scale.py [--workers 8 32 128] [--sigmas 0.5 1.0] [--seeds 3]
                                  [--budget-per-worker 20] [--dimension 16]
                                  [--objectives weighted|pareto] [--strategy NAME]

The real :class:`~evolve.search.SearchDriver` (its ledger on a temporary directory, tmpfs when
there is one) drives a simulated pool: each job takes a log-normal time with median 1 and the
given sigma (uneven generation lengths, mixed GPUs, a slow node), on a virtual clock that jumps
to the next completion (no sleeping).  Busy fraction = worker-time spent on jobs / worker-time
held: every worker from the start, each until the driver releases it once nothing is left to
hand out (as the Ray pool kills idle actors; one idle worker is kept while jobs still run).  The objective is synthetic with a known optimum
(1.0 at the hidden target weights): ``0.4 exp(-d2) + 0.6 / (1 + d2)`` of the squared distance
of the decoded task-arithmetic weights to the target.  With ``--objectives pareto`` the two
terms are two objectives (a multi-objective strategy, ``--strategy`` or the default), and "best"
is the front's best weighted-sum member.  Each cell is the median over ``--seeds`` seeds.  The last line reads ``min async busy fraction: X (8-128 workers, sigma 0.5-1.0)``.
"""

from __future__ import annotations

import argparse
import heapq
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evolve.config import parse_evolve_config  # noqa: E402
from evolve.genome import Genome  # noqa: E402
from evolve.protocols import Result  # noqa: E402
from evolve.search import SearchDriver  # noqa: E402
from evolve.storage import RunStorage  # noqa: E402

NUM_LAYERS = 16


def weights_of(recipe: dict) -> np.ndarray:
    return np.array([src["parameters"]["weight"] for sl in recipe["slices"] for src in sl["sources"]
                     if "parameters" in src])


class SimulatedPool:
    """A pool of ``num_workers`` on a virtual clock: jobs end after log-normal times.

    Workers are held from time 0; ``release_idle`` (called by the driver once nothing is left
    to hand out) lets idle ones go, as the Ray pool kills idle actors.  Busy fraction = job time
    / worker time held, up to the last result.
    """

    def __init__(self, num_workers: int, sigma: float, seed: int, target: np.ndarray) -> None:
        self.num_workers = num_workers
        self.sigma = sigma
        self.rng = np.random.default_rng(seed)
        self.target = target
        self.clock = 0.0
        self.busy = 0.0
        self.heap: list[tuple[float, int, int, str, dict]] = []
        self.jobs = 0
        self.running: set[int] = set()
        self.held_since: dict[int, float] = {w: 0.0 for w in range(num_workers)}  # unreleased workers
        self.held = 0.0  # worker-time of released workers

    def submit(self, eval_id: str, recipe: dict, task_set: str) -> None:
        idle = [w for w in range(self.num_workers) if w not in self.running]
        assert idle, "the driver overfilled the pool"
        worker = next((w for w in idle if w in self.held_since), idle[0])
        self.held_since.setdefault(worker, self.clock)  # a released worker is started again
        duration = float(self.rng.lognormal(0.0, self.sigma))
        self.busy += duration
        self.jobs += 1
        self.running.add(worker)
        heapq.heappush(self.heap, (self.clock + duration, self.jobs, worker, eval_id, recipe))

    def wait_any(self) -> list[Result]:
        done, _, worker, eval_id, recipe = heapq.heappop(self.heap)
        self.clock = done
        self.running.discard(worker)
        d2 = float(np.sum((weights_of(recipe) - self.target) ** 2))
        return [Result(eval_id, scores={"t1": {"acc,none": float(np.exp(-d2))}, "t2": {"acc,none": 1 / (1 + d2)}},
                       worker=f"sim-{worker}")]

    def release_idle(self, keep: int = 0) -> None:
        idle = [w for w in self.held_since if w not in self.running]
        for worker in idle[keep:]:
            self.held += self.clock - self.held_since.pop(worker)

    def close(self) -> None:
        pass

    def busy_fraction(self) -> float:
        held = self.held + sum(self.clock - t for t in self.held_since.values())
        return self.busy / held if held else 0.0


def one_run(root: Path, schedule: str, workers: int, sigma: float, seed: int, budget: int,
            groups: int, models: int, search: dict) -> tuple[float, float, int]:
    """(busy fraction, best fitness, train evaluations) of one simulated search."""
    config = parse_evolve_config({
        "genome": {"models": [f"m{i}" for i in range(models)], "merge_method": "task_arithmetic",
                   "base_model": "base", "layer_granularity": NUM_LAYERS // groups},
        "tasks": [{"name": "t1", "weight": 0.4}, {"name": "t2", "weight": 0.6}],
        **({"search": search} if search else {}),
    })
    genome = Genome(config.genome, NUM_LAYERS)
    target = np.random.default_rng(1000 + seed).uniform(0.1, 0.9, groups * models)
    pool = SimulatedPool(workers, sigma, seed, target)
    store = root / f"{schedule}-{workers}-{sigma}-{seed}"
    driver = SearchDriver(genome, RunStorage(store), config, seed=seed, max_fevals=budget, schedule=schedule,
                          sigma0=0.2, versions={"bench": "1"}, strategy=config.search.strategy if config.search else None)
    outcome = driver.run(pool)
    return pool.busy_fraction(), float(outcome.best["fitness"]) if outcome.best else float("nan"), outcome.evaluations


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget-per-worker", type=int, default=20)
    ap.add_argument("--dimension", type=int, default=16, help="genes: 4 layer groups x (dimension/4) models")
    ap.add_argument("--objectives", choices=("weighted", "pareto"), default="weighted",
                    help="pareto: each task an objective (a multi-objective strategy)")
    ap.add_argument("--strategy", help="a search.strategy name (default: the config default for --objectives)")
    ap.add_argument("--schedules", nargs="+", choices=("sync", "async"), default=["sync", "async"])
    args = ap.parse_args()
    search = {k: v for k, v in (("objectives", args.objectives if args.objectives != "weighted" else None),
                                ("strategy", args.strategy)) if v}
    groups, models = 4, max(1, args.dimension // 4)
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() else None
    print(f"simulated pool, log-normal job times (median 1), {groups * models} genes, budget "
          f"{args.budget_per_worker} x workers, median of {args.seeds} seeds; optimum 1.0; "
          f"search {search or 'default'}", flush=True)
    print(f"{'workers':>7} {'sigma':>5} {'schedule':>8} {'busy':>6} {'best':>7} {'evals':>6} {'s':>6}", flush=True)
    async_busy = []
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        for workers in args.workers:
            for sigma in args.sigmas:
                for schedule in args.schedules:
                    start = time.perf_counter()
                    runs = [one_run(Path(tmp), schedule, workers, sigma, seed, args.budget_per_worker * workers,
                                    groups, models, search) for seed in range(args.seeds)]
                    busy = statistics.median(r[0] for r in runs)
                    best = statistics.median(r[1] for r in runs)
                    evals = int(statistics.median(r[2] for r in runs))
                    if schedule == "async":
                        async_busy.append(busy)
                    print(f"{workers:>7} {sigma:>5.1f} {schedule:>8} {busy:>6.3f} {best:>7.4f} {evals:>6} "
                          f"{time.perf_counter() - start:>6.1f}", flush=True)
    lo_w, hi_w = min(args.workers), max(args.workers)
    lo_s, hi_s = min(args.sigmas), max(args.sigmas)
    if async_busy:
        print(f"min async busy fraction: {min(async_busy):.3f} ({lo_w}-{hi_w} workers, sigma {lo_s:g}-{hi_s:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
