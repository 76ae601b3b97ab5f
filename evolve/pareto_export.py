"""A multi-objective run's front on disk: ``STORAGE/pareto/`` (``search.objectives: pareto``).

- ``pareto/<eval_id>.yaml``: one mergekit recipe per non-dominated feasible candidate, its
  provenance (scores, held-out scores, seed, config hash, versions) as leading ``#`` comments.
- ``pareto/pareto.json``: the objectives, the hypervolume's reference point, the front (per
  member: train and held-out per-task scores, weighted fitness, recipe file) and the hypervolume
  of the front after each evaluation (in ledger order).

Every file is written atomically; recipes of candidates that left the front are removed after
``pareto.json`` names the new front.  The front is a function of the ledger
(:meth:`evolve.search.objectives.Objectives.front`), so the reports recompute it from any run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from evolve.search.objectives import Objectives, hypervolume
from merge_core.fsutil import atomic_write

__all__ = ["PARETO_DIR", "PARETO_JSON", "front_summary", "hypervolume_history", "print_front", "read_pareto",
           "report_front", "write_pareto"]

PARETO_DIR = "pareto"
PARETO_JSON = "pareto.json"


def hypervolume_history(objectives: Objectives, records: Iterable[Mapping[str, Any]]) -> list[list[float]]:
    """[evaluations, hypervolume of the front so far] after each train result, in ledger order."""
    ref = objectives.reference_point()
    out: list[list[float]] = []
    front: list[Mapping[str, Any]] = []
    volume = 0.0
    for n, rec in enumerate((r for r in records if r.get("kind") == "train"), start=1):
        grown = objectives.update_front(front, rec)
        if grown != front:
            front = grown
            volume = hypervolume([objectives.values(r) for r in front], ref)
        out.append([n, volume])
    return out


def front_summary(objectives: Objectives, records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """pareto.json's content (without files): the front with train and held-out scores."""
    records = list(records)
    held = {r["of"]: r for r in records if r.get("kind") == "held_out" and r.get("status") == "ok"}
    members = []
    for rec in objectives.front(records):
        h = held.get(rec["eval_id"])
        members.append({
            "eval_id": rec["eval_id"], "recipe_hash": rec["recipe_hash"], "recipe": f"{rec['eval_id']}.yaml",
            "train_scores": dict(zip(objectives.names, objectives.values(rec))),
            "train_fitness": float(rec["fitness"]),
            "held_out_scores": _flat(h["scores"]) if h else None,
            "held_out_fitness": float(h["fitness"]) if h else None,
        })
    history = hypervolume_history(objectives, records)
    return {"objectives": objectives.names, "reference_point": list(objectives.reference_point()),
            "floors": {t.name: t.min for t in objectives.tasks if t.min is not None},
            "hypervolume": history[-1][1] if history else 0.0, "front": members,
            "hypervolume_history": history}


def _flat(scores: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for name, value in scores.items():
        if isinstance(value, dict):
            for metric, v in value.items():
                out[f"{name}:{metric}"] = float(v)
        else:
            out[name] = float(value)
    return out


def write_pareto(storage: Any, objectives: Objectives, genome: Any, records: Iterable[Mapping[str, Any]], *,
                 run: Mapping[str, Any]) -> Path:
    """Write ``STORAGE/pareto/`` (see the module docstring); ``run``: seed, config hash,
    strategy and versions for the provenance comments.  Returns the directory."""
    records = list(records)
    summary = {**front_summary(objectives, records), **{k: run[k] for k in ("seed", "config_hash", "strategy")}}
    by_id = {r["eval_id"]: r for r in records if r.get("kind") == "train"}
    out = Path(storage.path) / PARETO_DIR
    out.mkdir(parents=True, exist_ok=True)
    for member in summary["front"]:
        recipe = genome.decode(by_id[member["eval_id"]]["x"])
        provenance = {**{k: member[k] for k in member if k != "recipe"}, "objectives": objectives.names,
                      **{k: run[k] for k in ("seed", "config_hash", "strategy", "versions")}}
        header = yaml.safe_dump(provenance, sort_keys=False, default_flow_style=None, width=100)
        comments = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
        text = "# merge-evolve Pareto front member; provenance:\n" + comments + yaml.safe_dump(
            recipe, sort_keys=False, default_flow_style=None)
        atomic_write(out / member["recipe"], text.encode())
    atomic_write(out / PARETO_JSON, (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())
    keep = {m["recipe"] for m in summary["front"]}
    for stale in out.glob("*.yaml"):
        if stale.name not in keep:
            stale.unlink()
    return out


def read_pareto(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's pareto.json, or None when it has none (a weighted run, or one still running)."""
    path = Path(run_dir) / PARETO_DIR / PARETO_JSON
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def report_front(manifest: Mapping[str, Any], records: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """``merge-evolve report``'s view of a multi-objective run's front (from the ledger, so a
    going run shows its front so far): objectives, floors, hypervolume and the members; None for
    a weighted run (or a manifest without a readable config)."""
    from evolve.config import parse_evolve_config
    from merge_core.errors import MergeError

    try:
        config = parse_evolve_config(manifest.get("config"))
    except (MergeError, ValueError):
        return None
    if config.search is None or config.search.objectives != "pareto":
        return None
    summary = front_summary(Objectives(config), records)
    summary.pop("hypervolume_history")
    return summary


def print_front(front: Mapping[str, Any]) -> None:
    """The front as ``merge-evolve report`` prints it: one line per member."""
    floors = ", ".join(f"{k} >= {v}" for k, v in front["floors"].items())
    print(f"pareto front: {len(front['front'])} members over {', '.join(front['objectives'])}"
          f"{f' (floors: {floors})' if floors else ''}; hypervolume {front['hypervolume']:.4f}")
    for m in front["front"]:
        scores = ", ".join(f"{k}={v:.3f}" for k, v in m["train_scores"].items())
        held = "-" if m["held_out_fitness"] is None else f"{m['held_out_fitness']:.4f}"
        print(f"  {m['eval_id']:<12}{m['train_fitness']:>9.4f}{held:>10}  {scores}  pareto/{m['recipe']}")
