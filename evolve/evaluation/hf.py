"""The HF backend: lm-eval's ``HFLM`` around one resident transformers model.

The merger writes each candidate's weights into ``HFEvaluator.model`` in place
(``InMemoryMerger.merge_into(plan, evaluator.model.state_dict())``), then
``evaluator.evaluate(tasks)`` scores the model as it is now with lm-eval's own loop
(:func:`evolve.evaluation.loop.evaluate_lm`).  The model, the tokenizer, the ``HFLM`` wrapper
and the task objects are built once.

Fitness, as mergekit-evolve computes it: the plain weighted sum ``sum(weight * score)`` over the
task entries (not divided by the total weight), so with unit weights it is the sum of scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM

from evolve.evaluation.loop import ResidentEvaluator, ResidentLM
from evolve.evaluation.quiet import quiet
from evolve.evaluation.settings import EvalError, EvalSettings
from evolve.evaluation.shared_context import SharedContextLM
from evolve.evaluation.tasks import TaskCatalog, TaskSet, memoize_lm_eval_templates
from merge_core.errors import ModelError, first_line

__all__ = ["HFEvaluator", "ResidentHFLM"]


class ResidentHFLM(ResidentLM, SharedContextLM, HFLM):
    """HFLM for a model that is scored many times on the same requests.

    - Progress bars off unless ``show_progress``: lm-eval's evaluate() never passes
      ``disable_tqdm`` to the model.
    - (context, continuation) tokenizations are memoised: the requests are the same text on every
      call (only the weights change), and re-tokenizing them costs ~10% of a toy evaluation.
    - ``max_length`` is resolved once (the model's config does not change).
    - Requests sharing a context are scored in one packed row (:mod:`evolve.evaluation.shared_context`)
      unless ``share_context`` is off.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # HFLM re-derives max_length from the config on every request; the config is fixed here.
        self._max_length = self.max_length


class HFEvaluator(ResidentEvaluator):
    """lm-eval's HF backend around one resident transformers model (see the module docstring).

    ``model`` is the ``nn.Module`` to write candidates into; ``lm`` the HFLM wrapping it.
    ``threads``: this process's torch threads (None: ``settings.threads``, else leave them).
    """

    def __init__(self, model_dir: str | Path, settings: EvalSettings = EvalSettings(),
                 threads: int | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.settings = settings
        self.model_dir = Path(model_dir)
        self.device = settings.resolved_device()
        threads = threads if threads is not None else settings.threads
        if threads is not None:
            torch.set_num_threads(threads)
        if settings.memoize_templates:
            memoize_lm_eval_templates()
        if not (self.model_dir / "config.json").is_file():
            raise ModelError(f"{self.model_dir}: not a model folder (no config.json)")
        with quiet(settings.quiet):
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
                model = AutoModelForCausalLM.from_pretrained(
                    str(self.model_dir), dtype=settings.resolved_dtype()
                )
            except (OSError, ValueError, KeyError) as exc:
                why = first_line(str(exc)) or type(exc).__name__
                raise ModelError(f"{self.model_dir}: cannot load model/tokenizer: {why}") from exc
            if settings.apply_chat_template and not getattr(tokenizer, "chat_template", None):
                raise EvalError(
                    f"apply_chat_template is set but the tokenizer of {self.model_dir} has no "
                    "chat template; set apply_chat_template: false"
                )
            self.model: torch.nn.Module = model.to(self.device).eval()
            # With a model object HFLM takes the device from the model, not from an argument.
            self.lm = ResidentHFLM(pretrained=self.model, tokenizer=tokenizer, batch_size=settings.batch_size)
            self.lm.show_progress = not settings.quiet
            self.lm.share_context = settings.share_context
        self.tokenizer = tokenizer
        self.catalog = TaskCatalog(settings.task_search_paths, builtin_tasks=settings.builtin_tasks)
        self._task_sets: dict[tuple, TaskSet] = {}

    def close(self) -> None:
        """Release the model, the lm-eval wrapper and the cached tasks."""
        self._task_sets.clear()
        self.lm = None
        self.model = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


