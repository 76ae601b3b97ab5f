"""Scoring a resident model with lm-eval, many times, as its weights are overwritten in place.

An evolve worker holds ONE model: the merger writes each candidate's weights into
``evaluator.model`` (``InMemoryMerger.merge_into(plan, evaluator.model)``) and then calls
``evaluator.evaluate(tasks)``, which scores the model as it is now.  Everything that does not
depend on the weights is built once and reused: the transformers model and tokenizer, lm-eval's
``HFLM`` wrapper around them, and the lm-eval task objects of each task list (see
:mod:`evolve.lm_tasks`).  Per call only lm-eval's own evaluation loop runs
(``lm_eval.evaluator.evaluate``: build requests, run the model, aggregate).  The vLLM backend
(:mod:`evolve.vllm_evaluation`) runs the same loop (:func:`evaluate_lm`) around its engine.

Scores equal ``lm_eval.simple_evaluate``'s for the same model, tasks and options, with
``random_seed = numpy_random_seed = torch_random_seed = fewshot_random_seed = settings.seed``.

Fitness, as mergekit-evolve computes it: the plain weighted sum ``sum(weight * score)`` over the
task entries (not divided by the total weight), so with unit weights it is the sum of scores.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Protocol, TextIO, Union

import numpy as np
import torch
from lm_eval.evaluator import evaluate as lm_eval_evaluate
from lm_eval.models.huggingface import HFLM

from evolve.lm_tasks import (
    EvalError,
    ResidentEvaluator,
    ResidentLM,
    TaskCatalog,
    TaskLike,
    TaskSet,
    TaskSpec,
    build_task_set,
    memoize_lm_eval_templates,
    quiet_lm_eval,
    unique_entries,
)
from evolve.shared_context import SharedContextLM
from merge_core.errors import ModelError

__all__ = [
    "EvalError",
    "EvalResult",
    "EvalSettings",
    "Evaluator",
    "HFEvaluator",
    "TaskLike",
    "TaskSpec",
    "cached_task_set",
    "evaluate_lm",
    "score_tasks",
]

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
}


@dataclass(frozen=True)
class EvalSettings:
    """How tasks are evaluated; the same for every candidate of a run.

    ``limit``: documents per task (a fraction when < 1), as lm-eval's ``limit``.
    ``num_fewshot``: overrides the tasks' few-shot counts (None: the tasks' own, else 0).
    ``shuffle``: permute each task's documents once with ``seed`` (``limit`` then takes a seeded
    random subset; every candidate sees the same one).
    ``seed``: lm-eval's random/numpy/torch/few-shot seeds, reset before every evaluation.
    ``task_search_paths``: extra task folders, searched after ``eval_tasks/`` of the checkout
    (always included; later folders override earlier ones).  ``builtin_tasks``: fall back to
    lm-eval's built-in tasks for names not found there (costs ~11 s the first time).
    ``device``: None picks cuda when available, else cpu.  ``dtype``: None picks float32 on
    cpu (bf16 matmuls are ~4x slower on CPUs without AMX) and bfloat16 on accelerators;
    "auto" keeps the checkpoint's dtype.  ``threads``: ``torch.set_num_threads`` for this
    process (None: leave it).  ``quiet``: no progress bars or INFO/WARNING lines from lm-eval.
    ``memoize_templates``: compile lm-eval's jinja prompt templates once per process (see
    :func:`evolve.lm_tasks.memoize_lm_eval_templates`; same prompts, ~20% faster on toy models).
    ``share_context``: score requests with the same context (the choices of a multiple-choice
    document) in one packed forward pass (:mod:`evolve.shared_context`; HF backend only).
    ``backend``: "hf" (:class:`HFEvaluator`) or "vllm" (:class:`evolve.vllm_evaluation.VLLMEvaluator`).
    ``vllm``: the vLLM engine settings (the config's ``vllm:`` section as a dict of
    :class:`evolve.config.VllmConfig` fields; None: its defaults); used by the vllm backend only.
    """

    limit: Optional[Union[int, float]] = None
    num_fewshot: Optional[int] = None
    shuffle: bool = False
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = True
    batch_size: Union[int, str] = 16
    seed: int = 1234
    task_search_paths: tuple[Path, ...] = ()
    builtin_tasks: bool = True
    device: Optional[str] = None
    dtype: Optional[str] = None
    threads: Optional[int] = None
    quiet: bool = True
    memoize_templates: bool = True
    backend: str = "hf"
    share_context: bool = True
    vllm: Optional[Mapping[str, Any]] = None

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> "EvalSettings":
        """Settings from an evolve config (any object with mergekit-evolve's option names)."""
        names = ("limit", "num_fewshot", "shuffle", "apply_chat_template", "fewshot_as_multiturn")
        values = {n: getattr(config, n) for n in names if hasattr(config, n)}
        engine = getattr(config, "vllm", None)
        if engine is not None:  # a VllmConfig (pydantic) or already a mapping
            values["vllm"] = dict(engine.model_dump() if hasattr(engine, "model_dump") else engine)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown EvalSettings fields: {', '.join(unknown)}")
        return cls(**{**values, **overrides})

    def resolved_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> Union[torch.dtype, str]:
        if self.dtype is None:
            return torch.float32 if self.resolved_device().type == "cpu" else torch.bfloat16
        if self.dtype == "auto":
            return "auto"
        try:
            return _DTYPES[self.dtype]
        except KeyError:
            raise EvalError(f"unknown dtype {self.dtype!r} (use one of {', '.join(_DTYPES)} or auto)") from None


@dataclass(frozen=True)
class EvalResult:
    """One evaluation: per-task scores, the weighted fitness and where it went wrong, if it did.

    ``scores`` is keyed by task name (``name:metric`` for a name listed with several metrics).
    ``fitness`` is None and ``error`` says why when a score is NaN or infinite (a degenerate
    candidate, not a configuration problem: the search can mark it failed and go on).
    ``metrics`` holds every numeric metric lm-eval reported per task and group (for logs);
    ``samples`` the documents evaluated per leaf task.
    """

    scores: dict[str, float]
    fitness: Optional[float]
    seconds: float
    error: Optional[str] = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


class Evaluator(Protocol):
    """Scores the model held in ``model`` as it is at the time of the call.

    ``model`` is the ``nn.Module`` the merger writes each candidate into, in place.
    """

    model: torch.nn.Module

    def evaluate(self, tasks: Sequence[TaskLike]) -> EvalResult: ...

    def close(self) -> None: ...


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


class _ResidentHFLM(ResidentLM, SharedContextLM, HFLM):
    """HFLM for a model that is scored many times on the same requests.

    - Progress bars off unless ``show_progress``: lm-eval's evaluate() never passes
      ``disable_tqdm`` to the model.
    - (context, continuation) tokenizations are memoised: the requests are the same text on every
      call (only the weights change), and re-tokenizing them costs ~10% of a toy evaluation.
    - ``max_length`` is resolved once (the model's config does not change).
    - Requests sharing a context are scored in one packed row (:mod:`evolve.shared_context`)
      unless ``share_context`` is off.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # HFLM re-derives max_length from the config on every request; the config is fixed here.
        self._max_length = self.max_length


class _DropProgressBars(io.TextIOBase):
    """A stderr stand-in that drops tqdm bars and passes everything else through.

    The per-task "building contexts" bar in lm-eval's Task.build_all_requests has no switch
    (tqdm reads TQDM_DISABLE only when it is first imported).  tqdm redraws start with "\\r"
    and a closing bar writes a lone newline; other text goes to the real stderr.
    """

    def __init__(self, target: TextIO) -> None:
        self._target = target
        self._after_bar = False

    def write(self, text: str) -> int:
        if "\r" in text:
            self._after_bar = True
            return len(text)
        if self._after_bar and not text.strip():
            self._after_bar = False
            return len(text)
        self._after_bar = False
        return self._target.write(text)

    def flush(self) -> None:
        self._target.flush()

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    with quiet_lm_eval(), contextlib.redirect_stderr(_DropProgressBars(sys.stderr)):
        yield


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
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


def cached_task_set(
    cache: dict[tuple, TaskSet], catalog: TaskCatalog, settings: EvalSettings, tasks: Sequence[TaskLike]
) -> TaskSet:
    """The configured lm-eval task objects for ``tasks`` from ``cache``, built on first use."""
    entries = unique_entries(tasks)
    key = tuple(entries)
    cached = cache.get(key)
    if cached is None:
        with _quiet(settings.quiet):
            cached = build_task_set(
                catalog,
                entries,
                num_fewshot=settings.num_fewshot,
                shuffle=settings.shuffle,
                seed=settings.seed,
            )
        cache[key] = cached
    return cached


def evaluate_lm(
    lm: Any, task_set: TaskSet, tasks: Sequence[TaskLike], settings: EvalSettings, device: torch.device
) -> EvalResult:
    """One lm-eval evaluation loop of a resident lm-eval model (any backend) on ``task_set``."""
    start = time.perf_counter()
    s = settings
    with _quiet(s.quiet), _seeded(s.seed, device):
        for task in task_set.leaf_tasks.values():
            # The sampler's RNG advanced during the last call: reset it so every call draws
            # the same few-shot examples, as a fresh simple_evaluate would.
            task.set_fewshot_seed(seed=s.seed)
        results = lm_eval_evaluate(
            lm=lm,
            task_dict=task_set.task_dict,
            limit=s.limit,
            bootstrap_iters=0,  # stderr only; the scores do not depend on it
            log_samples=False,
            apply_chat_template=s.apply_chat_template,
            fewshot_as_multiturn=s.fewshot_as_multiturn,
        )
    scored = score_tasks(tasks, results["results"])
    samples = {name: int(count["effective"]) for name, count in results.get("n-samples", {}).items()}
    return EvalResult(
        scores=scored.scores,
        fitness=scored.fitness,
        seconds=time.perf_counter() - start,
        error=scored.error,
        metrics=scored.metrics,
        samples=samples,
    )


class HFEvaluator(ResidentEvaluator):
    """lm-eval's HF backend around one resident transformers model (see the module docstring).

    ``model`` is the ``nn.Module`` to write candidates into; ``lm`` the HFLM wrapping it.
    """

    def __init__(self, model_dir: str | Path, settings: EvalSettings = EvalSettings()) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.settings = settings
        self.model_dir = Path(model_dir)
        self.device = settings.resolved_device()
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        if settings.memoize_templates:
            memoize_lm_eval_templates()
        if not (self.model_dir / "config.json").is_file():
            raise ModelError(f"{self.model_dir}: not a model folder (no config.json)")
        with _quiet(settings.quiet):
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
                model = AutoModelForCausalLM.from_pretrained(
                    str(self.model_dir), dtype=settings.resolved_dtype()
                )
            except (OSError, ValueError, KeyError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ModelError(f"{self.model_dir}: cannot load model/tokenizer: {first}") from exc
            if settings.apply_chat_template and not getattr(tokenizer, "chat_template", None):
                raise EvalError(
                    f"apply_chat_template is set but the tokenizer of {self.model_dir} has no "
                    "chat template; set apply_chat_template: false"
                )
            self.model: torch.nn.Module = model.to(self.device).eval()
            # With a model object HFLM takes the device from the model, not from an argument.
            self.lm = _ResidentHFLM(pretrained=self.model, tokenizer=tokenizer, batch_size=settings.batch_size)
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

