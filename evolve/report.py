"""``merge-evolve report``: what a run directory holds, for people and for scripts.

Read-only: it never writes into the run directory (a run may be going on in it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from merge_core.errors import RecipeError


def summarize(storage_path: Path) -> dict[str, Any]:
    """Counts, the best candidate (train and held-out) and the top five of a run directory."""
    from evolve.storage import RunStorage

    if not (storage_path / "evaluations.jsonl").exists() and not (storage_path / "run.json").exists():
        raise RecipeError("--storage-path", f"'{storage_path}' holds no merge-evolve run")
    storage = RunStorage(storage_path)
    records = storage.load_evaluations(repair=False)  # read-only: a torn last line is skipped, not cut
    manifest = storage.read_manifest() or {}
    train = [r for r in records if r.get("kind") == "train"]
    held = {r["of"]: r for r in records if r.get("kind") == "held_out"}
    ok = sorted((r for r in train if r["status"] == "ok"), key=lambda r: -r["fitness"])
    failed = [r for r in train if r["status"] == "failed"]

    def brief(r: dict[str, Any]) -> dict[str, Any]:
        h = held.get(r["eval_id"])
        return {"eval_id": r["eval_id"], "fitness": r["fitness"], "scores": r["scores"],
                "held_out_fitness": h["fitness"] if h else None}

    return {
        "storage_path": str(storage_path),
        "seed": manifest.get("seed"),
        "budget": manifest.get("max_fevals"),
        "popsize": manifest.get("popsize"),
        "evaluations": len([r for r in train if r.get("cached_from") is None]),
        "cache_hits": len([r for r in train if r.get("cached_from") is not None]),
        "failed": len(failed),
        "failure_reasons": sorted({r.get("reason") or "" for r in failed})[:5],
        "generations": len({r["generation"] for r in train}),
        "best": brief(ok[0]) if ok else None,
        "top": [brief(r) for r in ok[:5]],
        "best_config": str(storage_path / "best_config.yaml") if (storage_path / "best_config.yaml").exists() else None,
    }


def report(storage_path: Path, *, as_json: bool = False) -> int:
    """Print the summary of a run directory; exit code 0."""
    summary = summarize(storage_path)
    if as_json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"run {summary['storage_path']}: {summary['evaluations']} evaluations "
          f"({summary['cache_hits']} cache hits, {summary['failed']} failed) over "
          f"{summary['generations']} generations; budget {summary['budget']}, seed {summary['seed']}")
    for reason in summary["failure_reasons"]:
        print(f"  failure: {reason}")
    if summary["best"] is None:
        print("no successful candidate yet")
        return 0
    print(f"{'eval_id':<14}{'fitness':>9}{'held-out':>10}  scores")
    for r in summary["top"]:
        held = "-" if r["held_out_fitness"] is None else f"{r['held_out_fitness']:.4f}"
        scores = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r["scores"].items())
        print(f"{r['eval_id']:<14}{r['fitness']:>9.4f}{held:>10}  {scores}")
    if summary["best_config"]:
        print(f"best recipe: {summary['best_config']}")
    return 0
