"""Score models on the toy lm-eval tasks through lm-eval's Python API (fp32, CPU).

Task objects are built once and the same HFLM wraps one model object whose weights are swapped
with ``load_state_dict``: each evaluation then costs only the forward passes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _quiet_lm_eval() -> None:
    for name in ("lm-eval", "lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


class Scorer:
    """lm-eval accuracy of one model object on fixed tasks, for any number of weight sets."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 tasks: Sequence[str], include_path: Path, batch_size: int = 64) -> None:
        _quiet_lm_eval()
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager, get_task_dict

        class _QuietHFLM(HFLM):  # lm-eval's progress bars ignore TQDM_DISABLE
            def loglikelihood(self, requests, disable_tqdm: bool = False):  # type: ignore[override]
                return super().loglikelihood(requests, disable_tqdm=True)

        self.tasks = list(tasks)
        self.model = model.to(torch.float32).eval()
        manager = TaskManager(include_path=str(include_path), include_defaults=False, verbosity="ERROR")
        self._task_dict = get_task_dict(self.tasks, manager)
        self._lm = _QuietHFLM(pretrained=self.model, tokenizer=tokenizer, device="cpu",
                              batch_size=batch_size, dtype="float32")

    def score(self, state_dict: Mapping[str, torch.Tensor] | None = None,
              limit: int | None = None) -> dict[str, float]:
        """Accuracy per task (on the first ``limit`` docs of each, if given), after loading
        ``state_dict`` into the model (if given)."""
        from lm_eval import evaluator

        if state_dict is not None:
            self.model.load_state_dict(state_dict, strict=True)
        with torch.no_grad():
            out = evaluator.evaluate(lm=self._lm, task_dict=self._task_dict, bootstrap_iters=0, limit=limit,
                                     log_samples=False, verbosity="ERROR")
        return {t: float(out["results"][t]["acc,none"]) for t in self.tasks}
