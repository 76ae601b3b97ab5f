"""Finding and building lm-eval task objects once, for many evaluations.

Task names are looked up in our own task folders first (``eval_tasks/`` of the checkout plus any
``task_search_paths``): a :class:`~lm_eval.tasks.TaskManager` that indexes only those folders
builds in ~0.01 s, while indexing lm-eval's ~10k built-in task YAMLs takes ~11 s.  lm-eval's
built-in tasks are indexed only when a name is not found locally (and ``builtin_tasks`` allows it).

The built task objects are configured here once (few-shot count, evaluation split, shuffled
document order) and then reused by every evaluation; what must be reset per evaluation (the
few-shot sampler's seed) is reset by the evaluator.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, runtime_checkable

import evolve
from evolve.evaluation.quiet import quiet
from evolve.evaluation.settings import EvalError, EvalSettings
from merge_core.errors import MergeError

__all__ = [
    "TaskCatalog",
    "TaskLike",
    "TaskSet",
    "build_task_set",
    "cached_task_set",
    "default_task_dir",
    "memoize_lm_eval_templates",
    "search_paths",
    "unique_entries",
]


@runtime_checkable
class TaskLike(Protocol):
    """What the evaluator needs of a task entry (:class:`evolve.config.TaskConfig` is one)."""

    name: str
    weight: float
    metric: str
    split: Optional[str]


def default_task_dir() -> Path:
    """The checkout's ``eval_tasks/`` folder.

    The package is installed editable (``pip install -e .``), so ``evolve/__init__.py`` lives in
    the checkout and ``eval_tasks/`` is its sibling: ``Path(evolve.__file__).parents[1]``.
    """
    return Path(evolve.__file__).resolve().parents[1] / "eval_tasks"


def search_paths(extra: Sequence[str | Path] = ()) -> list[Path]:
    """``eval_tasks/`` followed by ``extra`` (resolved, duplicates and missing folders dropped).

    lm-eval lets later include paths override earlier ones, so a user's folder can redefine
    one of our toy tasks.
    """
    out: list[Path] = []
    for candidate in [default_task_dir(), *map(Path, extra)]:
        path = candidate.expanduser().resolve()
        if path not in out and path.is_dir():
            out.append(path)
    return out


def memoize_lm_eval_templates() -> None:
    """Compile each of lm-eval's jinja prompt templates once per process instead of once per use.

    ``lm_eval.utils.apply_template`` calls ``env.from_string(template)`` for every document and
    field (prompt, target, ...), recompiling the same few templates thousands of times: ~20% of
    a toy-model evaluation.  This wraps that one Environment's ``from_string`` with a cache for
    the plain ``from_string(source)`` call; compiled templates are immutable, so renders are
    unchanged.  Idempotent; affects every lm-eval evaluation in the process (to the same result).
    """
    from lm_eval import utils

    env = utils.env
    if getattr(env.from_string, "_evolve_memoized", False):
        return
    original = env.from_string
    compiled = functools.lru_cache(maxsize=4096)(original)

    def from_string(source: Any, globals: Any = None, template_class: Any = None) -> Any:
        if globals is None and template_class is None and isinstance(source, str):
            return compiled(source)
        return original(source, globals, template_class)

    from_string._evolve_memoized = True  # type: ignore[attr-defined]
    env.from_string = from_string  # instance attribute: lm-eval's own Environment only


class TaskCatalog:
    """Task managers over our search paths, built lazily and shared by every task list."""

    def __init__(self, paths: Sequence[str | Path] = (), *, builtin_tasks: bool = True) -> None:
        self.paths = search_paths(paths)
        self.builtin_tasks = builtin_tasks
        self._local: Any = None
        self._with_builtin: Any = None

    def _manager(self, builtin: bool) -> Any:
        from lm_eval.tasks import TaskManager

        if builtin:
            if self._with_builtin is None:
                self._with_builtin = TaskManager(include_path=[str(p) for p in self.paths] or None)
            return self._with_builtin
        if self._local is None:
            self._local = TaskManager(include_path=[str(p) for p in self.paths], include_defaults=False)
        return self._local

    def manager_for(self, names: Sequence[str]) -> Any:
        """A TaskManager that knows every name in ``names``; EvalError naming the first unknown one."""
        local = self._manager(builtin=False)
        missing = [n for n in names if n not in local.task_index]
        if not missing:
            return local
        if self.builtin_tasks:
            full = self._manager(builtin=True)
            missing = [n for n in missing if n not in full.task_index]
            if not missing:
                return full
        where = ", ".join(str(p) for p in self.paths) or "(no task folders)"
        also = " and lm-eval's built-in tasks" if self.builtin_tasks else ""
        raise EvalError(f"unknown lm-eval task {missing[0]!r}: not found in {where}{also}")


@dataclass
class TaskSet:
    """Configured lm-eval task objects for one list of (task name, split) entries."""

    task_dict: dict  # TaskManager.load()'s {"tasks", "groups", "group_map"}
    names: tuple[str, ...]

    @property
    def leaf_tasks(self) -> dict[str, Any]:
        return self.task_dict["tasks"]


def unique_entries(tasks: Sequence[TaskLike]) -> list[tuple[str, Optional[str]]]:
    """The distinct (name, split) pairs of ``tasks`` in first-seen order.

    A name listed twice (say with two metrics or weights) is evaluated once, as mergekit-evolve
    does; the same name with two different splits would collide in lm-eval's results: an error.
    """
    seen: dict[str, Optional[str]] = {}
    for task in tasks:
        split = getattr(task, "split", None)
        if task.name in seen and seen[task.name] != split:
            raise EvalError(
                f"task {task.name!r} is listed with two splits ({seen[task.name]!r} and {split!r}); "
                "evaluate them in separate calls"
            )
        seen[task.name] = split
    return list(seen.items())


def build_task_set(
    catalog: TaskCatalog,
    entries: Sequence[tuple[str, Optional[str]]],
    *,
    num_fewshot: Optional[int],
    shuffle: bool,
    seed: int,
) -> TaskSet:
    """Build and configure the task objects for ``entries`` (done once per task list).

    ``num_fewshot`` follows ``lm_eval.simple_evaluate``: it overrides a task's own count unless
    the task pins 0, and a task with no count gets 0.  ``shuffle`` permutes the evaluation split
    once with ``seed`` (so ``limit`` picks a seeded random subset, the same for every candidate).
    """
    names = [name for name, _ in entries]
    manager = catalog.manager_for(names)
    try:
        loaded = manager.load(names)
    except MergeError:
        raise
    except Exception as exc:  # lm-eval/datasets errors: data file missing, bad YAML, ...
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise EvalError(f"cannot build lm-eval tasks {names}: {message}") from exc
    for name, split in entries:
        for task in _leaf_tasks_of(loaded, name):
            _configure(task, split=split, num_fewshot=num_fewshot, shuffle=shuffle, seed=seed)
    return TaskSet(task_dict=loaded, names=tuple(names))


def _leaf_tasks_of(loaded: dict, name: str) -> list[Any]:
    """The leaf task objects that ``name`` (a task or a group) stands for."""
    if name in loaded["tasks"]:
        return [loaded["tasks"][name]]
    group = loaded["groups"].get(name)
    if group is not None:
        return list(group.get_all_tasks())
    return []  # a tag: TaskManager expanded it into leaf tasks under their own names


def _configure(task: Any, *, split: Optional[str], num_fewshot: Optional[int], shuffle: bool, seed: int) -> None:
    if split is not None:
        available = list(getattr(task, "dataset", None) or [])
        if split not in available:
            raise EvalError(
                f"task {task.config.task!r}: no split {split!r} (available: {', '.join(map(str, available)) or 'none'})"
            )
        # Documents are read through config.test_split at evaluation time (Task.eval_docs), so
        # pointing it at another split of the already-loaded dataset evaluates that split.
        task.set_config(key="test_split", value=split)
    if num_fewshot is not None:
        if task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    if shuffle:
        eval_split = task.config.test_split or task.config.validation_split
        # flatten_indices: a shuffled view reads rows through an index map on every pass.
        task.dataset[eval_split] = task.dataset[eval_split].shuffle(seed=seed).flatten_indices()


def cached_task_set(
    cache: dict[tuple, TaskSet], catalog: TaskCatalog, settings: EvalSettings, tasks: Sequence[TaskLike]
) -> TaskSet:
    """The configured lm-eval task objects for ``tasks`` from ``cache``, built on first use."""
    entries = unique_entries(tasks)
    key = tuple(entries)
    cached = cache.get(key)
    if cached is None:
        with quiet(settings.quiet):
            cached = build_task_set(
                catalog,
                entries,
                num_fewshot=settings.num_fewshot,
                shuffle=settings.shuffle,
                seed=settings.seed,
            )
        cache[key] = cached
    return cached
