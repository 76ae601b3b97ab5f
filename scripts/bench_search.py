#!/usr/bin/env python
"""Search quality on the toy zoo: medians over seeds, never one lucky seed.

    python scripts/bench_search.py [--seeds 0 1 2 3 4] [--budget 100] [--schedules async]
                                   [--strategies cmaes] [--racing on off] [--workers 2]
                                   [--zoo zoo] [--extra "--flag value"] [--search racing_level=cut]

Runs ``merge-evolve configs/toy.yml`` (with ``search: {strategy: S}``) once per schedule x
strategy x racing x seed (``--budget`` evaluations, ``--workers`` Ray workers) and reads each
ledger: the best train fitness after the first 25%, 50% and 100% of the budget (in ledger
order), the final best's held-out fitness, and the documents scored relative to scoring every
candidate on every document.  Prints one row per run, then per combination the medians and the
worst seed, with the zoo's parents and grid best (its matrix.json) for reference; the last line
reads ``median best at B evaluations: X, worst: Y, documents scored: Z of full`` for the first
combination (the defaults come first).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "toy.yml"


def read_run(store: Path, budget: int) -> dict:
    """Best-so-far at fractions of the budget, the final best's held-out score, documents used."""
    records = [json.loads(line) for line in (store / "evaluations.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    held = {r["of"]: r for r in records if r["kind"] == "held_out" and r["status"] == "ok"}
    out: dict = {"evaluations": sum(r.get("cached_from") is None for r in train)}
    for frac in (0.25, 0.5, 1.0):
        n = max(1, round(budget * frac))
        ok = [r["fitness"] for r in train[:n] if r["status"] == "ok"]
        out[f"best@{n}"] = max(ok) if ok else float("nan")
    provenance = json.loads((store / "best_config.provenance.json").read_text())
    out["best"] = provenance["train_fitness"]
    out["held_out"] = provenance.get("held_out_fitness")
    if out["held_out"] is None and provenance["eval_id"] in held:
        out["held_out"] = held[provenance["eval_id"]]["fitness"]
    docs = [r.get("documents") for r in train if r.get("cached_from") is None]
    full = [r.get("documents_full") for r in train if r.get("cached_from") is None]
    out["documents"] = (sum(d for d in docs if d) / sum(f for f in full if f)) if all(docs) and all(full) else 1.0
    return out


def config_for(strategy: str, work: Path, search: dict | None = None) -> Path:
    """configs/toy.yml with ``search: {strategy: ..., **search}`` (the zoo paths stay relative)."""
    import yaml

    data = yaml.safe_load(TOY.read_text())
    data.setdefault("search", {}).update({"strategy": strategy, **(search or {})})
    path = work / f"toy-{strategy}.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_one(python: str, zoo: Path, store: Path, config: Path, schedule: str, racing: bool, seed: int,
            budget: int, workers: int, extra: list[str]) -> dict:
    cmd = [python, "-m", "evolve.cli", str(config), "--storage-path", str(store), "-q", "--no-save-final-model",
           "--random-seed", str(seed), "--max-fevals", str(budget), "--num-workers", str(workers),
           f"--{schedule}", "--racing" if racing else "--no-racing", "--ray-address", "local", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=zoo.parent, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return {**read_run(store, budget), "seconds": time.perf_counter() - start}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--schedules", nargs="+", default=["async"], choices=("async", "sync"))
    ap.add_argument("--strategies", nargs="+", default=["cmaes"])
    ap.add_argument("--racing", nargs="+", default=["on", "off"], choices=("on", "off"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--zoo", type=Path, default=REPO / "zoo", help="a built toy zoo (scripts/build_zoo.py)")
    ap.add_argument("--extra", default="", help="more merge-evolve flags for every run")
    ap.add_argument("--search", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more keys of the config's search section, YAML values (racing_level=cut)")
    args = ap.parse_args()
    import yaml

    search = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.search)}
    zoo = args.zoo.resolve()
    if not (zoo / "matrix.json").is_file():
        raise SystemExit(f"no toy zoo at {zoo}: run python scripts/build_zoo.py --out {zoo}")
    matrix = json.loads((zoo / "matrix.json").read_text())
    say = lambda line: print(line, flush=True)  # noqa: E731
    reference = {m: v["search"] for m, v in matrix["objective"].items()}
    say(f"toy config {TOY.name}, budget {args.budget}, {args.workers} workers, seeds {args.seeds}; reference "
        "objective (zoo/matrix.json): " + ", ".join(f"{m} {v:.3f}" for m, v in sorted(reference.items())))
    keys = [f"best@{max(1, round(args.budget * f))}" for f in (0.25, 0.5, 1.0)]
    say(f"{'run':>22} {'seed':>4} " + " ".join(f"{k:>9}" for k in keys) + f" {'held-out':>9} {'docs':>5} {'s':>5}")
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "zoo").symlink_to(zoo, target_is_directory=True)
        combos = [(sc, st, rc) for sc in args.schedules for st in args.strategies for rc in args.racing]
        for schedule, strategy, racing in combos:
            label = f"{schedule}/{strategy}/{'race' if racing == 'on' else 'full'}"
            config = config_for(strategy, work, search)
            rows = []
            for seed in args.seeds:
                row = run_one(sys.executable, work / "zoo", work / f"{label.replace('/', '-')}-{seed}", config,
                              schedule, racing == "on", seed, args.budget, args.workers, shlex.split(args.extra))
                rows.append(row)
                held = "-" if row["held_out"] is None else f"{row['held_out']:.4f}"
                say(f"{label:>22} {seed:>4} " + " ".join(f"{row[k]:>9.4f}" for k in keys)
                    + f" {held:>9} {row['documents']:>5.2f} {row['seconds']:>5.0f}")
            summary[label] = rows
    for label, rows in summary.items():
        finals = [r[keys[-1]] for r in rows]
        helds = [r["held_out"] for r in rows if r["held_out"] is not None]
        say(f"{label}: median best " + ", ".join(f"{k} {statistics.median(r[k] for r in rows):.4f}" for k in keys)
            + f"; worst {min(finals):.4f}; median held-out {statistics.median(helds) if helds else float('nan'):.4f}; "
            f"documents {statistics.median(r['documents'] for r in rows):.2f} of full")
    first = next(iter(summary.values()))
    finals = [r[keys[-1]] for r in first]
    say(f"median best at {args.budget} evaluations: {statistics.median(finals):.4f}, worst: {min(finals):.4f}, "
        f"documents scored: {statistics.median(r['documents'] for r in first):.2f} of full")
    return 0


if __name__ == "__main__":
    sys.exit(main())
