"""How candidates are scored (:class:`EvalSettings`), what one scoring returns (:class:`EvalResult`),
and the error an evaluation reports (:class:`EvalError`).

Scores equal ``lm_eval.simple_evaluate``'s for the same model, tasks and options, with
``numpy_random_seed = torch_random_seed = fewshot_random_seed = settings.seed`` (by default
1234, lm-eval's own defaults; lm-eval's ``random_seed`` seeds Python's ``random``, which nothing
on the scoring path reads).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import torch

from merge_core.dtypes import DTYPE_ALIASES, RECIPE_DTYPES, torch_dtype
from merge_core.errors import MergeError

__all__ = ["EvalError", "EvalResult", "EvalSettings"]


class EvalError(MergeError):
    """An evaluation cannot run or its result cannot be read (one line, names the task/metric)."""


@dataclass(frozen=True)
class EvalSettings:
    """How tasks are evaluated; the same for every candidate of a run.

    ``limit``: documents per task (a fraction when < 1), as lm-eval's ``limit``.
    ``num_fewshot``: overrides the tasks' few-shot counts (None: the tasks' own, else 0).
    ``shuffle``: permute each task's documents once with ``seed`` (``limit`` then takes a seeded
    random subset; every candidate sees the same one).
    ``seed``: lm-eval's random/numpy/torch/few-shot seeds, reset before every evaluation (also
    the document shuffle's); 1234 by default as lm-eval's and mergekit-evolve's, and never the
    search seed (a run takes it from its config's ``fewshot_seed``, see
    :func:`evolve.config.fewshot_seed_of`).
    ``task_search_paths``: extra task folders, searched after ``eval_tasks/`` of the checkout
    (always included; later folders override earlier ones).  ``builtin_tasks``: fall back to
    lm-eval's built-in tasks for names not found there (costs ~11 s the first time).
    ``device``: None picks cuda when available, else cpu.  ``dtype``: None picks float32 on
    cpu (bf16 matmuls are ~4x slower on CPUs without AMX) and bfloat16 on accelerators;
    "auto" keeps the checkpoint's dtype.  ``threads``: ``torch.set_num_threads`` for this
    process (None: leave it).  ``quiet``: no progress bars or INFO/WARNING lines from lm-eval.
    ``memoize_templates``: compile lm-eval's jinja prompt templates once per process (see
    :func:`evolve.evaluation.tasks.memoize_lm_eval_templates`; same prompts, ~20% faster on toy
    models).  ``share_context``: score requests with the same context (the choices of a
    multiple-choice document) in one packed forward pass (:mod:`evolve.evaluation.shared_context`;
    HF backend only).  ``backend``: a name of :data:`evolve.evaluation.EVALUATORS` ("hf" or
    "vllm").  ``vllm``: the vLLM engine settings (the config's ``vllm:`` section as a dict of
    :class:`evolve.config.VllmConfig` fields; None: its defaults); used by the vllm backend only.
    ``trust_remote_code``: let model folders run their own Python code (``--trust-remote-code``);
    passed explicitly to every load, so transformers never asks on a terminal.
    ``resized_vocabulary``: the model folder's config has a merged vocabulary's size and its
    weights the model's own: the token-indexed tensors are sized to the config (HF backend;
    vLLM starts with placeholder weights; :mod:`evolve.workers.vocabulary_model`).
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
    resized_vocabulary: bool = False
    trust_remote_code: bool = False

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> "EvalSettings":
        """Settings from an evolve config (any object with mergekit-evolve's option names)."""
        names = ("limit", "num_fewshot", "shuffle", "apply_chat_template", "fewshot_as_multiturn")
        values = {n: getattr(config, n) for n in names if hasattr(config, n)}
        if getattr(config, "fewshot_seed", None) is not None:
            values["seed"] = int(config.fewshot_seed)
        engine = getattr(config, "vllm", None)
        if engine is not None:  # a VllmConfig (pydantic) or already a mapping
            values["vllm"] = dict(engine.model_dump() if hasattr(engine, "model_dump") else engine)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown EvalSettings fields: {', '.join(unknown)}")
        return cls(**{**values, **overrides})

    def resolved_device(self) -> torch.device:
        """The evaluation device (cuda when available and none was named)."""
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> Union[torch.dtype, str]:
        """The evaluation dtype as a torch dtype, or "auto" (the checkpoint's own)."""
        if self.dtype is None:
            return torch.float32 if self.resolved_device().type == "cpu" else torch.bfloat16
        if self.dtype == "auto":
            return "auto"
        try:
            dtype = torch_dtype(self.dtype, aliases=True)
        except KeyError:
            known = ", ".join([*RECIPE_DTYPES, *DTYPE_ALIASES])
            raise EvalError(f"unknown dtype {self.dtype!r} (use one of {known} or auto)") from None
        assert dtype is not None
        return dtype

    def torch_dtype(self) -> Optional[torch.dtype]:
        """:meth:`resolved_dtype` as a torch dtype, None for "auto"."""
        dtype = self.resolved_dtype()
        return dtype if isinstance(dtype, torch.dtype) else None


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
    per_doc: dict[str, dict[int, float]] = field(default_factory=dict)  # task -> doc id -> metric value

    @property
    def ok(self) -> bool:
        """True when every score is finite."""
        return self.error is None
