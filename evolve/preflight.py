"""Everything checked before a run writes anything: fail in one line, not after a night.

A run goes through these, in order, and only then creates (or continues) its run directory:

1. :func:`check_storage_path`: ``--storage-path`` is a directory or can become one (no file in
   the way, writable); a run to resume is complete enough to resume (:func:`load_run_config`).
2. :func:`check_environment`: the device and evaluation dtype exist here.
3. :func:`check_task_names`: lm-eval knows every task.
4. :func:`check_models`: every model of the genome resolves, is a safetensors checkpoint of a
   supported architecture with a valid depth, all have the same depth, the model the workers
   evaluate has a tokenizer, every ``genome.filters`` entry matches a tensor, and the template
   recipe plans (shapes and vocabularies agree).  Errors name the config field.
5. :func:`preflight_evaluation`: the workers are started and the model they start from (the
   base model, else the first genome model) is scored once through the real evaluator with the
   run's real settings, on the train tasks and on the held-out tasks: an unknown task, a metric
   the task does not report, a missing chat template or a broken evaluation stop here.

Every problem is a :class:`~merge_core.errors.MergeError` (the CLI prints one line, exit 2).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evolve.config import EvolveConfig, load_evolve_config
from evolve.options import RunOptions
from evolve.protocols import HELD_OUT, TRAIN, EvaluationPool, Result
from merge_core.errors import MergeError, ModelError, RecipeError

__all__ = [
    "CONFIG_DIR",
    "STORED_CONFIG",
    "CheckedModels",
    "PreflightError",
    "check_environment",
    "check_models",
    "check_storage_path",
    "check_task_names",
    "check_vllm_layout",
    "create_run_directory",
    "load_run_config",
    "model_recipe",
    "preflight_evaluation",
]

STORED_CONFIG = "config.yml"
CONFIG_DIR = "config_dir.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
PREFLIGHT_ID = "preflight"


class PreflightError(MergeError):
    """The run's setup cannot work (found before the search started); one line."""


# -- storage ------------------------------------------------------------------------------


def check_storage_path(path: Path, *, resume: bool) -> None:
    """``--storage-path`` is usable: a directory (or nothing yet, under a writable directory)."""
    if path.exists() and not path.is_dir():
        raise RecipeError("--storage-path", f"'{path}' is a file, not a directory")
    ancestor = path
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if ancestor != path and not ancestor.is_dir():
        raise RecipeError("--storage-path", f"'{path}' cannot be created: '{ancestor}' is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise RecipeError("--storage-path", f"'{ancestor}' is not writable")
    if resume and not (path / STORED_CONFIG).is_file():
        raise RecipeError("--storage-path", f"no run to resume in '{path}' (no {STORED_CONFIG})")


def load_run_config(options: RunOptions, resume: bool) -> tuple[EvolveConfig, Path]:
    """The evolve config and the folder its relative model paths are resolved against.

    A new run: the config file given and the current directory.  ``resume``: the run
    directory's stored copy and the folder recorded beside it.  Writes nothing.
    """
    storage = options.storage_path
    if not resume:
        assert options.config is not None
        return load_evolve_config(options.config), Path.cwd()
    config = load_evolve_config(storage / STORED_CONFIG)
    record = storage / CONFIG_DIR
    hint = (f"write the folder you first ran merge-evolve from into it (e.g. `pwd > {record}` there), "
            "or run `merge-evolve CONFIG --storage-path ...` from that folder")
    try:
        folder = record.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise PreflightError(f"run directory '{storage}' is damaged: {CONFIG_DIR} is missing; {hint}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PreflightError(f"run directory '{storage}' is damaged: cannot read {CONFIG_DIR} ({exc}); {hint}") from None
    if not folder or not Path(folder).is_dir():
        raise PreflightError(f"run directory '{storage}' is damaged: {CONFIG_DIR} names no existing folder "
                             f"({folder!r}); {hint}")
    return config, Path(folder)


def create_run_directory(options: RunOptions, relative_to: Path) -> None:
    """Create the run directory with the config and its folder, unless it already holds them."""
    from merge_core.fsutil import atomic_write

    storage = options.storage_path
    storage.mkdir(parents=True, exist_ok=True)
    if not (storage / STORED_CONFIG).exists():
        assert options.config is not None
        atomic_write(storage / STORED_CONFIG, options.config.read_bytes())
        atomic_write(storage / CONFIG_DIR, str(relative_to).encode())


# -- environment --------------------------------------------------------------------------


def check_environment(options: RunOptions) -> None:
    """The evaluation device and dtype exist on this machine (:func:`evolve.flag_checks.
    check_device_and_dtype`, which the CLI already ran before its heavy imports)."""
    from evolve.flag_checks import check_device_and_dtype

    check_device_and_dtype(options.device, options.eval_dtype)


# -- models -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedModels:
    """The genome's models as checked: infos by reference, the shared depth, the evaluated model."""

    infos: dict[str, Any]  # reference -> merge_core.model_ref.ModelInfo
    num_layers: int
    evaluated: str  # the reference the workers load as their model (base, else models[0])

    def path(self, ref: str) -> Path:
        """The local directory of ``ref``."""
        return Path(self.infos[ref].path)


def _model_refs(config: EvolveConfig) -> list[tuple[str, str]]:
    """(config path, reference) of every model the genome names, the base first when it has one."""
    g = config.genome
    refs = [("genome.base_model", g.base_model)] if g.base_model else []
    refs += [(f"genome.models[{i}]", m) for i, m in enumerate(g.models)]
    if g.tokenizer_source not in (None, "base", "union") and g.tokenizer_source not in dict(refs).values():
        refs.append(("genome.tokenizer_source", g.tokenizer_source))
    source = (g.tokenizer or {}).get("source")
    if isinstance(source, str) and source not in ("base", "union") and source not in dict(refs).values():
        refs.append(("genome.tokenizer.source", source))
    return refs


def check_models(config: EvolveConfig, relative_to: Path, *, allow_crimes: bool = False) -> CheckedModels:
    """Read and check every model of the genome (see the module docstring); no tensor is loaded."""
    import numpy as np

    from evolve.genome import Genome
    from merge_core.architecture import architecture_for
    from merge_core.model_ref import load_model, refuse_same_model_twice
    from merge_core.planner import Planner
    from merge_core.recipe import recipe_from_dict

    refs = _model_refs(config)
    infos: dict[str, Any] = {}
    depth: dict[str, int] = {}
    for where, ref in refs:
        try:
            info = load_model(ref, relative_to=relative_to)
            arch = architecture_for(info.config, ref, info.tensors)
        except ModelError as err:
            raise RecipeError(where, str(err)) from None
        infos[ref] = info
        depth[ref] = arch.num_layers()
    genome_models = [(f"genome.models[{i}]", m) for i, m in enumerate(config.genome.models)]
    refuse_same_model_twice([(where, ref, infos[ref].identity) for where, ref in genome_models])
    first_where, first = refs[0]
    for where, ref in refs[1:]:
        if depth[ref] != depth[first]:
            raise RecipeError(where, f"'{ref}' has {depth[ref]} layers but {first_where} '{first}' has "
                                     f"{depth[first]}; the models of a genome need the same depth")
    evaluated = config.genome.base_model or config.genome.models[0]
    eval_where = "genome.base_model" if config.genome.base_model else "genome.models[0]"
    eval_dir = Path(infos[evaluated].path)
    if not any((eval_dir / name).is_file() for name in TOKENIZER_FILES):
        raise RecipeError(eval_where, f"'{evaluated}' has no tokenizer ({' / '.join(TOKENIZER_FILES[:2])}) "
                                      f"in {eval_dir}: the workers load the model they evaluate from there")
    names = list(infos[evaluated].tensors)
    for i, pattern in enumerate(config.genome.filters or []):
        if not any(pattern in name for name in names):
            raise RecipeError(f"genome.filters[{i}]", f"{pattern!r} matches no tensor of '{evaluated}' "
                                                      f"(tensor names look like {names[len(names) // 2]!r})")
    genome = Genome(config.genome, depth[first])
    template = genome.decode(genome.initial_point(False, np.random.default_rng(0)))
    try:
        Planner(infos, relative_to=relative_to, allow_crimes=allow_crimes).plan(recipe_from_dict(template))
    except (RecipeError, ModelError) as err:
        message = err.message if isinstance(err, RecipeError) and not err.path else str(err)
        raise RecipeError("genome", f"the genome's models cannot be merged: {message}") from None
    return CheckedModels(infos, depth[first], evaluated)


def check_vllm_layout(models: CheckedModels) -> None:
    """vLLM loads pushed weights by their checkpoint names; candidates are merged in the layout of
    transformers' models, which fuses the experts of MoE checkpoints (merge_core.checkpoint_view):
    such a model is refused for --vllm in one line."""
    from merge_core.tensor_io import CheckpointReader

    with CheckpointReader(models.path(models.evaluated)) as reader:
        fused = next((name for name in reader.names() if name not in reader.stored_names()), None)
    if fused is not None:
        raise RecipeError("--vllm", f"'{models.evaluated}' is a mixture of experts whose experts transformers "
                                    f"fuses ({fused}): the vLLM evaluator cannot take its pushes yet; use the "
                                    "HF backend (drop --vllm)")


# -- tasks --------------------------------------------------------------------------------


def check_task_names(config: EvolveConfig, search_paths: tuple[Path, ...]) -> None:
    """Every task name is one lm-eval finds (our task folders, then its built-in tasks)."""
    from evolve.evaluation import EvalError, TaskCatalog

    catalog = TaskCatalog(search_paths)
    for key in ("tasks", "held_out"):
        for i, task in enumerate(getattr(config, key)):
            try:
                catalog.manager_for([task.name])
            except EvalError as err:
                raise RecipeError(f"{key}[{i}].name", str(err)) from None


# -- the first evaluation -----------------------------------------------------------------


def model_recipe(ref: str, num_layers: int, dtype: str) -> dict[str, Any]:
    """A recipe whose merge is model ``ref`` itself (passthrough of all its layers), rounded to
    ``dtype`` like every candidate: scores the input models with the same workers."""
    return {"merge_method": "passthrough", "dtype": dtype,
            "slices": [{"sources": [{"model": ref, "layer_range": [0, num_layers]}]}]}


def preflight_recipe(config: EvolveConfig, models: CheckedModels, dtype: str) -> dict[str, Any]:
    """What the preflight scores: the evaluated model, as every candidate is scored -- in the
    run's vocabulary when the genome merges vocabularies (its tokenizer settings; a recipe
    without them would be scored in the model's own, :mod:`evolve.workers.own_vocabulary`)."""
    recipe = model_recipe(models.evaluated, models.num_layers, dtype)
    g = config.genome
    if g is not None and g.tokenizer_source is not None:
        recipe["tokenizer_source"] = g.tokenizer_source
    if g is not None and g.tokenizer is not None:
        recipe["tokenizer"] = dict(g.tokenizer)
    return recipe


def preflight_evaluation(pool: EvaluationPool, config: EvolveConfig, models: CheckedModels,
                         dtype: str) -> dict[str, Result]:
    """Score :func:`preflight_recipe` once on each task set through ``pool``; the results by
    task set.

    Raises :class:`PreflightError` naming the task set and the reason when a scoring fails or
    a score is not a finite number.
    """
    from evolve.search.fitness import weighted_fitness

    recipe = preflight_recipe(config, models, dtype)
    sets = {TRAIN: config.tasks, HELD_OUT: config.held_out}
    jobs = {f"{PREFLIGHT_ID}/{name}": name for name, tasks in sets.items() if tasks}
    for job, task_set in jobs.items():
        pool.submit(job, recipe, task_set)
    results: dict[str, Result] = {}
    while len(results) < len(jobs):
        for result in pool.wait_any():
            results[jobs[result.eval_id]] = result
    for task_set in jobs.values():
        result = results[task_set]
        what = "held-out" if task_set == HELD_OUT else "train"
        reason = result.reason if result.status != "ok" else None
        if reason is None:
            try:
                weighted_fitness(sets[task_set], result.scores)
            except ValueError as exc:
                reason = str(exc)
        if reason is not None:
            raise PreflightError(f"preflight: scoring '{models.evaluated}' on the {what} tasks failed, so every "
                                 f"candidate would: {reason}")
    return {task_set: results[task_set] for task_set in jobs.values()}  # train first, whoever finished first
