#!/usr/bin/env python
"""Multi-objective search on the toy zoo: hypervolume of the fronts, medians over seeds.

    python scripts/bench_pareto.py [--seeds 0 1 2 3 4] [--budget 100]
                                   [--strategies chebyshev-cmaes mo-tpe nsga2]
                                   [--floor toy_prompt_format=0.95] [--racing] [--held-out] [--zoo zoo]

Per seed, in one process with one in-process worker (models loaded once), on configs/toy.yml's
three tasks (each an objective, maximized):

- each multi-objective strategy (``search: {objectives: pareto, strategy: S}``),
- the weighted-sum CMA-ES run (the config as it is: ``cmaes``, its candidates' front),
- random search (uniform points of the genome's box, the same budget),
- a constrained run of the first strategy (``--floor``: ``tasks[i].min``) beside the
  unconstrained one of the same strategy.

Hypervolume: of the non-dominated candidates scored on every document, above the reference
point 0 on every task (:func:`evolve.search.objectives.hypervolume`; the three scores are in
[0, 1], so 1.0 is the whole cube); "feasible hv" counts only the candidates that meet the floor,
above it.  "best" is the best weighted fitness (the config's weights) among the run's candidates
(for the constrained pair: among the feasible ones).  Candidates are scored on every document
(``--racing`` to race, as a default run does), and held-out re-scoring is off (``--held-out``).
The last line reads ``median hypervolume at B evaluations: ...`` (every search, the
multi-objective ones first).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TOY = REPO / "configs" / "toy.yml"


def make_pool(config: Any, genome: Any, relative_to: Path, racing: bool) -> Any:
    """One in-process worker for every run (as ``merge-evolve --no-ray`` builds it)."""
    from evolve.evaluation import EvalSettings
    from evolve.workers import LocalPool, WorkerSpec

    settings = EvalSettings.from_config(config, device="cpu")
    template = genome.decode(genome.initial_point(False, np.random.default_rng(0)))
    spec = WorkerSpec(template_recipe=template, settings=settings, train_tasks=list(config.tasks),
                      held_out_tasks=list(config.held_out), relative_to=relative_to, seed=0, racing=racing, threads=1)
    return LocalPool(spec)


def search_run(pool: Any, genome_of: Any, config: Any, store: Path, seed: int, budget: int,
               strategy: str, racing: bool) -> list[dict[str, Any]]:
    """One search (the driver, async, one worker); its train records in ledger order."""
    from evolve.search import SearchDriver
    from evolve.search.driver import RaceSettings
    from evolve.storage import RunStorage

    driver = SearchDriver(genome_of(config), RunStorage(store), config, seed=seed, max_fevals=budget,
                          schedule="async", strategy=strategy, versions={"bench": "1"},
                          racing=RaceSettings() if racing else None)
    driver.run(pool)
    return [r for r in RunStorage(store).load_evaluations() if r["kind"] == "train"]


def random_run(pool: Any, genome: Any, config: Any, seed: int, budget: int) -> list[dict[str, Any]]:
    """Uniform random points of the genome's box, scored on every document."""
    from evolve.protocols import TRAIN
    from evolve.search.fitness import weighted_fitness

    lo, hi = (np.asarray(b, dtype=np.float64) for b in genome.bounds)
    rng = np.random.default_rng([seed, 0xA11])
    out = []
    for i in range(budget):
        pool.submit(f"r{i:04d}", genome.decode(rng.uniform(lo, hi)), TRAIN)
        (res,) = pool.wait_any()
        rec = {"kind": "train", "eval_id": res.eval_id, "seq": i, "recipe_hash": f"r{i}", "cached_from": None,
               "status": res.status, "scores": dict(res.scores or {})}
        rec["fitness"] = weighted_fitness(config.tasks, rec["scores"]) if res.status == "ok" else -1.0
        out.append(rec)
    return out


def measure(records: list[dict[str, Any]], config: Any, floored: Any) -> dict[str, float]:
    """Hypervolume (of all, and of the feasible under ``floored``'s floors) and best weighted fitness."""
    from evolve.search.objectives import Objectives, hypervolume, violation

    obj, fobj = Objectives(config), Objectives(floored)
    full = [r for r in records if r["status"] == "ok" and not (r.get("race") or {}).get("stopped")
            and r.get("cached_from") is None]
    points = [obj.values(r) for r in full]
    feasible = [r for r in full if violation(floored.tasks, r["scores"]) == 0]
    return {"hv": hypervolume(points, (0.0,) * len(points[0]) if points else ()),
            "feasible_hv": hypervolume([fobj.values(r) for r in feasible], fobj.reference_point()),
            "best": max((r["fitness"] for r in full), default=float("nan")),
            "best_feasible": max((r["fitness"] for r in feasible), default=float("nan")),
            "feasible": len(feasible) / max(len(full), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--strategies", nargs="+", default=["mo-tpe", "chebyshev-cmaes", "nsga2"])
    ap.add_argument("--floor", default="toy_prompt_format=0.95", metavar="TASK=MIN")
    ap.add_argument("--racing", action="store_true", help="race candidates on documents (default: score all)")
    ap.add_argument("--held-out", action="store_true", help="keep the config's held-out tasks (more evaluations)")
    ap.add_argument("--zoo", type=Path, default=REPO / "zoo", help="a built toy zoo (scripts/build_zoo.py)")
    args = ap.parse_args()
    import yaml

    from evolve import preflight
    from evolve.config import parse_evolve_config
    from evolve.genome import Genome

    zoo = args.zoo.resolve()
    if not (zoo / "matrix.json").is_file():
        raise SystemExit(f"no toy zoo at {zoo}: run python scripts/build_zoo.py --out {zoo}")
    base = yaml.safe_load(TOY.read_text())
    if not args.held_out:
        base.pop("held_out", None)
    floor_task, _, floor_min = args.floor.partition("=")

    def variant(search: dict[str, Any] | None = None, floor: bool = False) -> Any:
        data = copy.deepcopy(base)
        if search:
            data["search"] = search
        if floor:
            names = [t["name"] for t in data["tasks"]]
            if floor_task not in names:
                raise SystemExit(f"--floor: no task {floor_task!r} in {TOY.name} (tasks: {', '.join(names)})")
            data["tasks"][names.index(floor_task)]["min"] = float(floor_min)
        return parse_evolve_config(data)

    weighted, floored = variant(), variant(floor=True)
    runs: dict[str, Any] = {s: variant({"objectives": "pareto", "strategy": s}) for s in args.strategies}
    runs["cmaes (weighted)"] = variant({"strategy": "cmaes"})
    constrained = f"{args.strategies[0]} + floor"
    runs[constrained] = variant({"objectives": "pareto", "strategy": args.strategies[0]}, floor=True)
    say = lambda line: print(line, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "zoo").symlink_to(zoo, target_is_directory=True)
        models = preflight.check_models(weighted, work, allow_crimes=False)
        genome_of = lambda config: Genome.for_run(config.genome, models.num_layers, None)  # noqa: E731
        pool = make_pool(weighted, genome_of(weighted), work, args.racing)
        say(f"toy config {TOY.name} (3 objectives), budget {args.budget}, seeds {args.seeds}, floor {args.floor}, "
            f"{'racing' if args.racing else 'every document'}")
        say(f"{'search':>26} {'seed':>4} {'hv':>7} {'hv@half':>7} {'best':>7} {'feas.hv':>7} {'best feas':>9} "
            f"{'feasible':>8} {'s':>5}")
        table: dict[str, list[dict[str, float]]] = {name: [] for name in [*runs, "random"]}
        for seed in args.seeds:
            for name in [*runs, "random"]:
                start = time.perf_counter()
                if name == "random":
                    records = random_run(pool, genome_of(weighted), weighted, seed, args.budget)
                else:
                    config = runs[name]
                    strategy = config.search.strategy
                    records = search_run(pool, genome_of, config, work / f"{name.replace(' ', '_')}-{seed}", seed,
                                         args.budget, strategy, args.racing)
                row = measure(records, weighted, floored)
                row["hv@half"] = measure(records[: args.budget // 2], weighted, floored)["hv"]
                row["s"] = time.perf_counter() - start
                table[name].append(row)
                say(f"{name:>26} {seed:>4} {row['hv']:>7.4f} {row['hv@half']:>7.4f} {row['best']:>7.4f} "
                    f"{row['feasible_hv']:>7.4f} {row['best_feasible']:>9.4f} {row['feasible']:>8.2f} {row['s']:>5.0f}")
        pool.close()
    med = {name: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for name, rows in table.items()}
    for name, m in med.items():
        say(f"{name}: median hv {m['hv']:.4f} (at {args.budget // 2}: {m['hv@half']:.4f}), worst "
            f"{min(r['hv'] for r in table[name]):.4f}; median best weighted {m['best']:.4f}; feasible hv "
            f"{m['feasible_hv']:.4f}, best feasible {m['best_feasible']:.4f}")
    gap = med["cmaes (weighted)"]["best"] - med[args.strategies[0]]["best"]
    say(f"{args.strategies[0]}'s best weighted member vs the weighted-sum run's best: {-gap:+.4f} (medians)")
    say(f"median hypervolume at {args.budget} evaluations: "
        + ", ".join(f"{name} {m['hv']:.4f}" for name, m in med.items() if name != constrained))
    return 0


if __name__ == "__main__":
    sys.exit(main())
