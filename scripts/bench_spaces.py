#!/usr/bin/env python
"""Parameter space vs layer stacking vs both, at equal evaluation budgets, on the toy zoo.

    python scripts/bench_spaces.py [--budget 100] [--seeds 0 1 2] [--workers 2] [--zoo zoo]

- parameter space: ``configs/toy.yml`` for ``--budget`` evaluations;
- stacking: ``configs/toy_stacking.yml`` for ``--budget`` evaluations;
- both (Sakana's PS+DFS): ``configs/toy.yml`` for half the budget, then a stacking run for the
  other half whose sources are that run's ``best_config.yaml`` and the three experts.

Prints each run's best train fitness and held-out fitness, then the median per space over the
seeds; the last line reads ``median best at B evaluations: parameter space X, stacking Y, both Z``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def run(config: Path, store: Path, cwd: Path, seed: int, budget: int, workers: int) -> dict:
    cmd = [sys.executable, "-m", "evolve.cli", str(config), "--storage-path", str(store), "-q", "--random-seed",
           str(seed), "--max-fevals", str(budget), "--num-workers", str(workers), "--no-baselines",
           "--ray-address", "local"]  # never a cluster some other job started on this machine
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    provenance = json.loads((store / "best_config.provenance.json").read_text())
    return {"best": provenance["train_fitness"], "held_out": provenance.get("held_out_fitness"),
            "seconds": time.perf_counter() - start}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--zoo", type=Path, default=REPO / "zoo")
    args = ap.parse_args()
    say = lambda line: print(line, flush=True)  # noqa: E731
    results: dict[str, list[dict]] = {"parameter space": [], "stacking": [], "both": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "zoo").symlink_to(args.zoo.resolve(), target_is_directory=True)
        toy, stacking = REPO / "configs" / "toy.yml", REPO / "configs" / "toy_stacking.yml"
        say(f"toy zoo, budget {args.budget}, {args.workers} workers, seeds {args.seeds}")
        for seed in args.seeds:
            ps = run(toy, work / f"ps-{seed}", work, seed, args.budget, args.workers)
            st = run(stacking, work / f"st-{seed}", work, seed, args.budget, args.workers)
            half = args.budget // 2
            first = run(toy, work / f"both-ps-{seed}", work, seed, half, args.workers)
            both_config = yaml.safe_load(stacking.read_text())
            both_config["stacking"]["sources"] = [str(work / f"both-ps-{seed}" / "best_config.yaml"),
                                                  *both_config["stacking"]["sources"]]
            (work / f"both-{seed}.yml").write_text(yaml.safe_dump(both_config))
            second = run(work / f"both-{seed}.yml", work / f"both-st-{seed}", work, seed, args.budget - half,
                         args.workers)
            winner = second if second["best"] >= first["best"] else first  # the stage whose best is kept
            both = {"best": winner["best"], "held_out": winner["held_out"],
                    "seconds": first["seconds"] + second["seconds"], "stage1": first["best"]}
            for name, row in (("parameter space", ps), ("stacking", st), ("both", both)):
                results[name].append(row)
                held = "-" if row["held_out"] is None else f"{row['held_out']:.4f}"
                stage = f" (its parameter-space stage {row['stage1']:.4f})" if "stage1" in row else ""
                say(f"seed {seed} {name:>16}: best {row['best']:.4f}{stage}, held-out {held}, {row['seconds']:.0f} s")
    medians = {name: statistics.median(r["best"] for r in rows) for name, rows in results.items()}
    for name, rows in results.items():
        helds = [r["held_out"] for r in rows if r["held_out"] is not None]
        say(f"{name}: median best {medians[name]:.4f}, worst {min(r['best'] for r in rows):.4f}, median held-out "
            f"{statistics.median(helds) if helds else float('nan'):.4f}")
    say(f"median best at {args.budget} evaluations: parameter space {medians['parameter space']:.4f}, "
        f"stacking {medians['stacking']:.4f}, both {medians['both']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
