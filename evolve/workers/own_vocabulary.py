"""Scoring a model in its own vocabulary inside a run that merges vocabularies.

A worker of such a run holds a model sized to the run's merged vocabulary and evaluates with the
merged tokenizer (:mod:`evolve.workers.vocabulary_model`).  A recipe that names no tokenizer
settings (a parent's baseline, the preflight's passthrough of the evaluated model) has, as in
mergekit, its model's own vocabulary: scoring it through the merged tokenizer would read rows
the parent never had (an added chat token splits text the parent sees as ordinary pieces), so
"better than my inputs?" would compare against a parent nobody uses.  :class:`OwnVocabularyScorer`
scores such a recipe in a model loaded for it alone, from that model's folder with its own
tokenizer, kept while consecutive jobs name the same model (a parent's train and held-out
scores) and released before the next candidate.

On a GPU the side model takes its memory next to the worker's model while it is held; its
inputs are read from CPU memory (streamed), never made resident on the device.  Where it does
not fit, the worker scores the recipe in the run's vocabulary and notes so
(:data:`evolve.workers.worker.OWN_VOCABULARY_FALLBACK`).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["OwnVocabularyScorer", "names_no_vocabulary"]


def names_no_vocabulary(recipe: dict[str, Any]) -> bool:
    """Whether ``recipe`` (a recipe dict) leaves its vocabulary to its models (no
    ``tokenizer_source``, no ``tokenizer:`` section)."""
    return recipe.get("tokenizer_source") is None and recipe.get("tokenizer") is None


class OwnVocabularyScorer:
    """Merges a recipe into a model loaded from its own model's folder and scores it there.

    ``planner``: a :class:`merge_core.planner.Planner` with no fixed vocabulary; ``settings``:
    the worker's :class:`~evolve.evaluation.EvalSettings` (HF backend); ``threads``,
    ``round_to_recipe_dtype``, ``seed``: the worker's.  The merge runs on the side model's
    device, its inputs streamed from CPU memory (whatever the worker's merge device).
    """

    def __init__(self, planner: Any, settings: Any, *, threads: int | None, round_to_recipe_dtype: bool,
                 seed: int) -> None:
        self.planner = planner
        self.settings = settings
        self.threads = threads
        self.round_to_recipe_dtype = round_to_recipe_dtype
        self.seed = seed
        self.held: tuple[str, Any] | None = None  # (model folder, evaluator)

    def plan(self, recipe: dict[str, Any]) -> Any:
        """``recipe``'s plan in its own vocabulary."""
        from merge_core.recipe import recipe_from_dict

        return self.planner.plan(recipe_from_dict(recipe), seed=self.seed)

    def score(self, plan: Any, tasks: Sequence[Any], timings: dict[str, float]) -> tuple[dict[str, Any] | None, str | None]:
        """(scores, None) or (None, reason) of ``plan`` on ``tasks``; fills ``timings``'
        ``merge`` and ``eval`` (seconds)."""
        from merge_core.in_memory import InMemoryMerger

        start = time.perf_counter()
        donor = plan.base_model if plan.base_model is not None else 0
        evaluator = self._evaluator(str(plan.models[donor].path))
        params = evaluator.model.state_dict()
        device = next(iter(params.values())).device  # (a passthrough writes out= on its inputs' device)
        merger = InMemoryMerger(plan, device=str(device), resident=False)
        try:
            merger.merge_into(plan, params)
        finally:
            merger = None  # its inputs are this model's only: not kept
        if self.round_to_recipe_dtype and plan.out_dtype is not None:
            for task in plan.tasks:
                param = params[task.output]
                if param.dtype.is_floating_point and param.element_size() > plan.out_dtype.itemsize:
                    param.copy_(param.to(plan.out_dtype))
        bad = next((t.output for t in plan.tasks if not bool(torch.isfinite(params[t.output]).all())), None)
        timings["merge"] = time.perf_counter() - start
        if bad is not None:
            return None, f"non-finite weights in {bad}"
        eval_start = time.perf_counter()
        scored = evaluator.evaluate(list(tasks))
        timings["eval"] = time.perf_counter() - eval_start
        if scored.error is not None:
            return None, scored.error
        return dict(scored.scores), None

    def _evaluator(self, model_dir: str) -> Any:
        if self.held is not None and self.held[0] == model_dir:
            return self.held[1]
        self.release()
        from evolve.evaluation import evaluator_class

        evaluator = evaluator_class("hf")(Path(model_dir), self.settings, threads=self.threads)
        self.held = (model_dir, evaluator)
        return evaluator

    def release(self, *, after_failure: bool = False) -> None:
        """Drop the held model (before the next candidate, and at close); ``after_failure``: a
        load or merge ran out of memory, return what it had allocated too.  Nothing to do
        (every candidate of a run asks) costs nothing."""
        if self.held is None and not after_failure:
            return
        if self.held is not None:
            self.held[1].close()
            self.held = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
