"""What a run records about where its results came from: package versions, the best's provenance."""

from __future__ import annotations

from importlib import metadata
from typing import Any, Sequence

from evolve.baselines import baseline_provenance, task_list
from evolve.config import fewshot_seed_of

__all__ = ["VERSION_PACKAGES", "best_provenance", "package_versions"]

VERSION_PACKAGES = ("merge-evolve", "cma", "numpy", "pydantic", "lm_eval", "transformers", "torch", "vllm", "ray")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape results (for provenance)."""
    out = {}
    for name in VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def best_provenance(best: dict[str, Any], held: dict[str, Any] | None, *, config: Any, seed: int,
                    config_hash: str, evaluations_used: dict[str, int], search: dict[str, Any],
                    versions: dict[str, str], baselines: Sequence[dict[str, Any]] = (),
                    fewshot_seed: int | None = None) -> dict[str, Any]:
    """The provenance written beside ``best_config.yaml`` for the incumbent ledger record ``best``
    (``held``: its held-out record, if scored; ``baselines``: the run's baseline records, whose
    fitness and the best's gain over the best parent are added, see :mod:`evolve.baselines`;
    ``fewshot_seed``: the seed the scores were evaluated with, None: the config's, see
    :func:`evolve.config.fewshot_seed_of`)."""
    held_fitness = held["fitness"] if held and held["status"] == "ok" else None
    return {
        "eval_id": best["eval_id"],
        "recipe_hash": best["recipe_hash"],
        "seed": seed,
        "fewshot_seed": fewshot_seed if fewshot_seed is not None else fewshot_seed_of(config, None),
        "config_hash": config_hash,
        "tasks": task_list(config.tasks),
        "train_fitness": best["fitness"],
        "train_scores": best["scores"],
        "held_out_tasks": task_list(config.held_out),
        "held_out_fitness": held["fitness"] if held and held["status"] == "ok" else None,
        "held_out_scores": held["scores"] if held else None,
        "evaluations_used": evaluations_used,
        "search": search,
        "versions": versions,
        **baseline_provenance(baselines, best["fitness"], held_fitness),
    }
