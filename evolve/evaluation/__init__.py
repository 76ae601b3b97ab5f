"""Scoring candidates with lm-eval, many times, as a resident model's weights are overwritten.

The package's face; the backends are imported lazily through the registry:

- :class:`EvalSettings`, :class:`EvalResult`, :class:`EvalError` (:mod:`.settings`): how a run
  scores, what a scoring returns.
- :mod:`.tasks`: finding and configuring lm-eval task objects once (:class:`TaskCatalog`).
- :mod:`.loop`: lm-eval's loop around a resident model (:func:`evaluate_lm`) and the mixins the
  backends share.
- :data:`EVALUATORS` / :func:`evaluator_class` (:mod:`.registry`): ``"hf"`` ->
  :class:`evolve.evaluation.hf.HFEvaluator`, ``"vllm"`` ->
  :class:`evolve.evaluation.vllm.VLLMEvaluator`.
- :mod:`.shared_context`: the HF backend's one-pass scoring of a document's choices.

Importing this package imports torch but neither lm-eval nor vLLM.
"""

from evolve.evaluation.loop import evaluate_lm, score_tasks
from evolve.evaluation.registry import EVALUATORS, VLLM_MISSING, Evaluator, evaluator_class, vllm_available
from evolve.evaluation.settings import EvalError, EvalResult, EvalSettings
from evolve.evaluation.tasks import TaskCatalog, TaskLike, TaskSet, default_task_dir

__all__ = [
    "EVALUATORS",
    "VLLM_MISSING",
    "EvalError",
    "EvalResult",
    "EvalSettings",
    "Evaluator",
    "TaskCatalog",
    "TaskLike",
    "TaskSet",
    "default_task_dir",
    "evaluate_lm",
    "evaluator_class",
    "score_tasks",
    "vllm_available",
]
