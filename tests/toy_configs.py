"""The evolve config several CLI-level tests start from: two experts of the session's task models."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_evolve_config(models: dict[str, Path], tmp_path: Path, **extra: object) -> Path:
    """``tmp_path/evolve.yml``: task arithmetic of ``e1``, ``e2`` over ``base``, two weighted train
    tasks and one held-out task on 12 documents; ``extra`` replaces top-level keys."""
    data = {
        "genome": {"models": [str(models["e1"]), str(models["e2"])], "base_model": str(models["base"]),
                   "merge_method": "task_arithmetic", "layer_granularity": 2},
        "tasks": [{"name": "toy_arith", "weight": 0.6}, {"name": "toy_prompt_format", "weight": 0.4}],
        "held_out": [{"name": "toy_arith_heldout"}],
        "limit": 12,
        "apply_chat_template": False,
    }
    data.update(extra)
    path = tmp_path / "evolve.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
