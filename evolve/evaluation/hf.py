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

from evolve.evaluation.loop import NonFiniteScores, ResidentEvaluator, ResidentLM
from evolve.evaluation.quiet import quiet, transformers_quiet
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

    def generate_until(self, requests, disable_tqdm: bool = False):
        """lm-eval's generation, refusing text generated from NaN or infinite logits (greedy
        decoding then picks token 0 forever: a "score" that means nothing)."""
        head = self.model.get_output_embeddings()
        if head is None:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        bad = torch.zeros((), dtype=torch.bool, device=self.model.device)

        def watch(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
            bad.logical_or_(~torch.isfinite(output).all())  # no host sync per decoding step

        handle = head.register_forward_hook(watch)
        try:
            results = super().generate_until(requests, disable_tqdm=disable_tqdm)
        finally:
            handle.remove()
        if bool(bad):
            raise NonFiniteScores("the logits of a generation are NaN or infinite (the merged model's "
                                  "activations overflow)")
        return results


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
        with quiet(settings.quiet), transformers_quiet(settings.quiet):
            try:
                # trust_remote_code always explicit: left unset, transformers asks "[y/N]" on a
                # terminal (and a piped "y" would run the model folder's Python code).
                remote = settings.trust_remote_code
                tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), trust_remote_code=remote)
                model = AutoModelForCausalLM.from_pretrained(
                    str(self.model_dir), dtype=settings.resolved_dtype(), trust_remote_code=remote,
                    ignore_mismatched_sizes=settings.resized_vocabulary,
                )
            except (OSError, ValueError, KeyError) as exc:
                why = first_line(str(exc)) or type(exc).__name__
                if "custom code" in why and not remote:
                    why = "it needs its own Python code, which runs only with --trust-remote-code"
                raise ModelError(f"{self.model_dir}: cannot load model/tokenizer: {why}") from exc
            if settings.apply_chat_template and not getattr(tokenizer, "chat_template", None):
                raise EvalError(
                    f"apply_chat_template is set but the tokenizer of {self.model_dir} has no "
                    "chat template; set apply_chat_template: false"
                )
            self.model: torch.nn.Module = model.to(self.device).eval()
            # With a model object HFLM takes the device from the model, not from an argument.
            self.lm = ResidentHFLM(pretrained=self.model, tokenizer=tokenizer, batch_size=settings.batch_size,
                                   trust_remote_code=settings.trust_remote_code)
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


