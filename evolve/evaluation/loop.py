"""lm-eval's evaluation loop around a resident model, the same for every backend.

An evolve worker holds ONE model whose weights are overwritten in place for every candidate.
Everything that does not depend on the weights is built once and reused: the model wrapper and
the task objects (:mod:`evolve.evaluation.tasks`).  Per call only lm-eval's own loop runs
(``lm_eval.evaluator.evaluate``: build requests, run the model, aggregate), seeded as
``simple_evaluate`` seeds it, and its results are read into an :class:`EvalResult`.

The two mixins here are what the HF (:mod:`.hf`) and vLLM (:mod:`.vllm`) backends share:
:class:`ResidentLM` for their lm-eval model classes, :class:`ResidentEvaluator` for the
evaluators.  lm-eval itself is imported only when a loop runs.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from evolve.evaluation.quiet import quiet
from evolve.evaluation.settings import EvalError, EvalResult, EvalSettings
from evolve.evaluation.tasks import TaskCatalog, TaskLike, TaskSet, cached_task_set

__all__ = ["NonFiniteScores", "ResidentEvaluator", "ResidentLM", "check_finite", "evaluate_lm", "score_tasks",
           "seeded"]


class NonFiniteScores(EvalError):
    """The model produced NaN or infinite log-likelihoods or logits (overflowing weights): the
    metrics lm-eval would compute from them (an argmax over NaNs) mean nothing."""


def check_finite(values: Sequence[float], what: str = "log-likelihoods") -> None:
    """Raise :class:`NonFiniteScores` when any of ``values`` is NaN or infinite."""
    bad = sum(1 for v in values if not math.isfinite(v))
    if bad:
        raise NonFiniteScores(f"{bad} of {len(values)} {what} are NaN or infinite (the merged model's "
                              "activations overflow)")


def score_tasks(
    tasks: Sequence[TaskLike], results: dict[str, dict[str, Any]], seconds: float = 0.0
) -> EvalResult:
    """Read each task's metric from lm-eval's ``results["results"]`` and weigh them.

    A task or metric missing from ``results`` is an EvalError naming what is available.
    """
    metrics = {
        name: {k: float(v) for k, v in values.items() if _is_metric(k, v)}
        for name, values in results.items()
    }
    metric_names: dict[str, set[str]] = {}
    for task in tasks:
        metric_names.setdefault(task.name, set()).add(task.metric)
    scores: dict[str, float] = {}
    fitness = 0.0
    error = None
    for task in tasks:
        if task.name not in metrics:
            raise EvalError(
                f"task {task.name!r} has no results (reported: {', '.join(sorted(metrics)) or 'none'})"
            )
        available = metrics[task.name]
        if task.metric not in available:
            shown = ", ".join(sorted(k for k in available if "_stderr," not in k)) or "none"
            raise EvalError(f"task {task.name!r} has no metric {task.metric!r} (available: {shown})")
        value = available[task.metric]
        key = task.name if len(metric_names[task.name]) == 1 else f"{task.name}:{task.metric}"
        scores[key] = value
        if not math.isfinite(value) and error is None:
            error = f"task {task.name!r} metric {task.metric!r} is {value}"
        fitness += float(task.weight) * value
    return EvalResult(
        scores=scores,
        fitness=None if error else fitness,
        seconds=seconds,
        error=error,
        metrics=metrics,
    )


def _is_metric(key: str, value: Any) -> bool:
    # lm-eval's per-task entries mix metrics ("acc,none") with bookkeeping (alias, sample_len).
    return "," in key and isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed random/numpy/torch as simple_evaluate does, restoring the callers' states after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    # The CPU generator is always forked; on an accelerator also that device's generator.
    devices = [] if device.type == "cpu" else [device.index or 0]
    try:
        with torch.random.fork_rng(devices=devices, device_type=None if device.type == "cpu" else device.type):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def evaluate_lm(
    lm: Any, task_set: TaskSet, tasks: Sequence[TaskLike], settings: EvalSettings, device: torch.device,
    *, samples: Mapping[str, Sequence[int]] | None = None, per_doc: bool = False,
) -> EvalResult:
    """One lm-eval evaluation loop of a resident lm-eval model (any backend) on ``task_set``.

    ``samples``: evaluate only these documents (indices into each leaf task's evaluation
    documents; lm-eval's ``samples``; ``settings.limit`` is then not applied).  ``per_doc``:
    also return every document's value of each task's metric (``EvalResult.per_doc``).
    """
    from lm_eval.evaluator import evaluate as lm_eval_evaluate

    start = time.perf_counter()
    s = settings
    with quiet(s.quiet), seeded(s.seed, device):
        for task in task_set.leaf_tasks.values():
            # The sampler's RNG advanced during the last call: reset it so every call draws
            # the same few-shot examples, as a fresh simple_evaluate would.
            task.set_fewshot_seed(seed=s.seed)
        results = lm_eval_evaluate(
            lm=lm,
            task_dict=task_set.task_dict,
            limit=None if samples is not None else s.limit,
            # Sorted: lm-eval 0.4.13 iterates the chosen documents in dataset order but names each
            # logged sample by its position in the list given (evaluator.py: indices[doc_id]), so
            # an unsorted list (a race's seeded order) would put values on the wrong documents.
            samples={name: sorted(docs) for name, docs in samples.items()} if samples is not None else None,
            bootstrap_iters=0,  # stderr only; the scores do not depend on it
            log_samples=per_doc,
            apply_chat_template=s.apply_chat_template,
            fewshot_as_multiturn=s.fewshot_as_multiturn,
        )
    scored = score_tasks(tasks, results["results"])
    counts = {name: int(count["effective"]) for name, count in results.get("n-samples", {}).items()}
    return EvalResult(
        scores=scored.scores,
        fitness=scored.fitness,
        seconds=time.perf_counter() - start,
        error=scored.error,
        metrics=scored.metrics,
        samples=counts,
        per_doc=_per_doc(tasks, results.get("samples", {})) if per_doc else {},
    )


def _per_doc(tasks: Sequence[TaskLike], logged: Mapping[str, list[dict[str, Any]]]) -> dict[str, dict[int, float]]:
    """Each task's metric per document ({task name: {doc id: value}}), from lm-eval's logged samples.

    A ``metric`` is ``"<name>,<filter>"``; a logged sample holds one filter's values under the
    metric's name.  A task whose samples are not logged (a group) is left out.
    """
    out: dict[str, dict[int, float]] = {}
    for task in tasks:
        metric, _, filter_name = task.metric.partition(",")
        rows = [r for r in logged.get(task.name, []) if r.get("filter", "none") == (filter_name or "none")]
        if rows:
            out[task.name] = {int(r["doc_id"]): float(r[metric]) for r in rows if metric in r}
    return out


class ResidentLM:
    """Mixin for lm-eval LM classes scored many times on the same requests (put it first in the
    bases): progress bars only when ``show_progress`` (lm-eval's evaluate() never passes
    ``disable_tqdm``), and each (context, continuation) pair tokenized once per process -- only
    the weights change between calls, so lm-eval's per-request ``_encode_pair`` would repeat
    identical work.  The memo returns copies: callers own the lists they get.  Non-finite
    log-likelihoods raise :class:`NonFiniteScores` (a failed candidate, not a low score).
    """

    show_progress = False
    _MEMO_LIMIT = 500_000

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        results = super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.show_progress)
        check_finite([float(r[0]) for r in results])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        results = super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self.show_progress)
        check_finite([float(r) for r in results])
        return results

    def generate_until(self, requests, disable_tqdm: bool = False):
        return super().generate_until(requests, disable_tqdm=disable_tqdm or not self.show_progress)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        memo: dict[tuple[str, str], tuple[list[int], list[int]]] = self.__dict__.setdefault("_pair_memo", {})
        key = (context, continuation)
        hit = memo.get(key)
        if hit is None:
            if len(memo) >= self._MEMO_LIMIT:
                memo.clear()
            hit = super()._encode_pair(context, continuation)  # type: ignore[misc]
            memo[key] = hit
        return list(hit[0]), list(hit[1])


class ResidentEvaluator:
    """Mixin for evaluators that score one resident lm-eval model many times (HF and vLLM).

    The subclass sets ``lm`` (the lm-eval model), ``settings`` (an ``EvalSettings``), ``device``,
    ``catalog`` (a :class:`TaskCatalog`) and ``_task_sets`` (a dict) and defines ``close()``.
    """

    lm: Any
    settings: Any
    device: Any
    catalog: TaskCatalog
    _task_sets: dict

    def task_set(self, tasks: Sequence[TaskLike]) -> TaskSet:
        """The configured lm-eval task objects for ``tasks``, built on first use and cached."""
        return cached_task_set(self._task_sets, self.catalog, self.settings, tasks)

    def evaluate(self, tasks: Sequence[TaskLike], *, samples: Mapping[str, Sequence[int]] | None = None,
                 per_doc: bool = False) -> Any:
        """Score the model's current weights on ``tasks`` (an ``EvalResult``; ``samples`` and
        ``per_doc`` as in :func:`evaluate_lm`); EvalError on a missing task or metric."""
        if not tasks:
            raise EvalError("no tasks to evaluate")
        return evaluate_lm(self.lm, self.task_set(tasks), tasks, self.settings, self.device, samples=samples,
                           per_doc=per_doc)

    def close(self) -> None:  # pragma: no cover - every evaluator defines its own
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
