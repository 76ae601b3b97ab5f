"""The evaluation backends by name, resolved lazily: each one imports a heavy stack.

``EVALUATORS`` maps a backend name (``EvalSettings.backend``) to ``"module:Class"``; nothing is
imported until :func:`evaluator_class` is called, so choosing a backend never imports the other
(the main venv has no vLLM).  An evaluator is built as ``cls(model_dir, settings, threads=...)``
and provides ``evaluate(tasks)``, ``task_set(tasks)`` and ``close()``; backends whose weights
live outside a driver-side ``nn.Module`` (vLLM) set ``model`` to None and provide
``push_weights(state_dict)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, Protocol

from evolve.evaluation.settings import EvalError, EvalResult
from evolve.evaluation.tasks import TaskLike, TaskSet
from evolve.flag_checks import VLLM_MISSING, vllm_available  # defined where the CLI checks them, torch-free

__all__ = ["EVALUATORS", "VLLM_MISSING", "Evaluator", "evaluator_class", "vllm_available"]

EVALUATORS: dict[str, str] = {
    "hf": "evolve.evaluation.hf:HFEvaluator",
    "vllm": "evolve.evaluation.vllm:VLLMEvaluator",
}

class Evaluator(Protocol):
    """What every backend provides (see the module docstring)."""

    model: Any  # the nn.Module candidates are written into in place; None when the weights live elsewhere

    def task_set(self, tasks: Sequence[TaskLike]) -> TaskSet:
        """Build (once) and return the configured lm-eval task objects of ``tasks``."""

    def evaluate(self, tasks: Sequence[TaskLike], *, samples: Any = None, per_doc: bool = False) -> EvalResult:
        """Score the current weights on ``tasks`` (only the ``samples`` documents when given;
        ``per_doc``: with every document's value)."""

    def close(self) -> None:
        """Release the model and everything built for it."""


def evaluator_class(backend: str) -> Any:
    """The evaluator class registered as ``backend``; EvalError naming the known ones otherwise."""
    target = EVALUATORS.get(backend)
    if target is None:
        raise EvalError(f"unknown evaluation backend {backend!r} (expected one of {', '.join(EVALUATORS)})")
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
