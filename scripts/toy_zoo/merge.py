"""Task-arithmetic merges of the zoo's saved models, computed by the project's merge engine.

The build scores merges to show that the experts' skills can be combined; it uses
``merge_core`` (recipe -> plan -> in-memory merge), the same path merge-evolve takes, so the
matrix reports what the product would produce.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from merge_core.in_memory import InMemoryMerger
from merge_core.planner import Planner
from merge_core.recipe import recipe_from_dict


def task_arithmetic_recipe(base: Path, experts: Sequence[Path], weights: Sequence[float]) -> dict:
    """A mergekit-style ``task_arithmetic`` recipe (float32, no normalisation) as a plain dict."""
    if len(experts) != len(weights):
        raise ValueError(f"{len(experts)} experts but {len(weights)} weights")
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"weight": float(w)}} for p, w in zip(experts, weights)],
        "parameters": {"normalize": False},
        "dtype": "float32",
    }


class TaskArithmetic:
    """Merges ``base + sum_i w_i (expert_i - base)`` from saved model directories, in memory.

    Input tensors are read once and shared by every call; each call returns a new float32
    state dict keyed like the checkpoints (which is also the transformers state dict).
    """

    def __init__(self, base: Path, experts: Sequence[Path]) -> None:
        self.base, self.experts = Path(base), [Path(p) for p in experts]
        self._planner = Planner()
        self._merger = InMemoryMerger(dtype=torch.float32)

    def __call__(self, weights: Sequence[float]) -> dict[str, torch.Tensor]:
        recipe = recipe_from_dict(task_arithmetic_recipe(self.base, self.experts, weights))
        return self._merger.merged_state_dict(self._planner.plan(recipe), dtype=torch.float32)
