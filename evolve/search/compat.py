"""What a stored run must share with the session that resumes it, and what a manifest written
by an earlier version means by the keys it lacks (the driver's resume rules, in one place)."""

from __future__ import annotations

from typing import Any

from evolve.config import EvolveConfig, normalized_config, racing_confidence_of
from evolve.search.trajectory import SYNC

__all__ = ["LEGACY_DEFAULTS", "RESUME_KEYS", "manifest_config", "stored_value"]

# Settings a resumed run must share with the stored one (the budget may grow).
RESUME_KEYS = ("config", "seed", "popsize", "sigma0", "penalty", "num_layers", "dimension", "schedule",
               "genome_box", "strategy", "initial_design")
# What a manifest written before a key existed means by its absence.
LEGACY_DEFAULTS = {"schedule": SYNC, "strategy": "cmaes", "initial_design": 0}


def stored_value(stored: dict[str, Any] | None, key: str, new_run: Any) -> Any:
    """The stored run's ``key`` (its legacy meaning when its manifest lacks it), else ``new_run``."""
    if stored is None:
        return new_run
    return {**LEGACY_DEFAULTS, **stored}[key]


def manifest_config(config: EvolveConfig, stored: dict[str, Any] | None) -> dict[str, Any]:
    """The normalized config a manifest records, with the racing confidence the run uses written
    into its ``search`` section (a run stored before 0.3 recorded its default there, 2.0; the
    default has changed since, and the stored run keeps its own: see racing_confidence_of)."""
    data = normalized_config(config)
    if data.get("search") is not None:
        data["search"]["racing_confidence"] = racing_confidence_of(config, stored)
    return data
