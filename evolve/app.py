"""One ``merge-evolve run``/``resume``: wire config, genome, storage, workers and observers.

Wiring only: the search is :mod:`evolve.search`, scoring :mod:`evolve.evaluation`, the
workers :mod:`evolve.workers`.  Takes a :class:`~evolve.options.RunOptions`; paths are resolved
here, at the edge, and everything below gets in-memory objects.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from evolve.options import RunOptions
from merge_core.errors import ModelError, RecipeError

STORED_CONFIG = "config.yml"
CONFIG_DIR = "config_dir.txt"


def _load_config(options: RunOptions, resume: bool) -> tuple[Any, Path]:
    """The evolve config and the folder its relative model paths are resolved against."""
    from evolve.config import load_evolve_config
    from merge_core.fsutil import atomic_write

    stored = options.storage_path / STORED_CONFIG
    if resume:
        if not stored.exists():
            raise RecipeError("--storage-path",
                              f"no run to resume in '{options.storage_path}' (no {STORED_CONFIG})")
        source = Path((options.storage_path / CONFIG_DIR).read_text().strip())
        return load_evolve_config(stored), source
    assert options.config is not None
    config = load_evolve_config(options.config)
    options.storage_path.mkdir(parents=True, exist_ok=True)
    if not stored.exists():
        atomic_write(stored, options.config.read_bytes())
        atomic_write(options.storage_path / CONFIG_DIR, str(Path.cwd()).encode())
    return config, Path.cwd()


def _resolve_models(config: Any, relative_to: Path) -> dict[str, Path]:
    """Every model reference of the genome, resolved to a local directory (or a one-line error)."""
    from merge_core.model_ref import resolve_model_ref

    refs: list[tuple[str, str]] = [(f"genome.models[{i}]", m) for i, m in enumerate(config.genome.models)]
    if config.genome.base_model:
        refs.append(("genome.base_model", config.genome.base_model))
    resolved: dict[str, Path] = {}
    for path, ref in refs:
        try:
            resolved[ref] = resolve_model_ref(ref, relative_to=relative_to)
        except ModelError as err:
            raise RecipeError(path, str(err)) from None
    return resolved


def _num_layers(config: Any, models: dict[str, Path]) -> int:
    from merge_core.tensor_io import load_config

    ref = config.genome.base_model or config.genome.models[0]
    return int(load_config(models[ref])["num_hidden_layers"])


def _check_options(options: RunOptions) -> None:
    if options.vllm:
        from evolve.evaluation import VLLM_MISSING, vllm_available  # light: imports no vllm

        if not vllm_available():
            raise RecipeError("--vllm", VLLM_MISSING)
    for flag, value in (("--max-fevals", options.max_fevals), ("--num-workers", options.num_workers or 1)):
        if value < 1:
            raise RecipeError(flag, f"must be >= 1, got {value}")


def _placement(options: RunOptions) -> tuple[str, int | None, int]:
    """(device, workers, torch threads per worker): one worker per GPU (None: per GPU of the
    Ray cluster being joined, counted once connected), else share the cores."""
    import torch

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cores = os.cpu_count() or 1
    workers: int | None
    if device.startswith("cuda"):
        gpus = options.num_gpus or torch.cuda.device_count()
        workers = options.num_workers or max(gpus, 1)
        if options.ray_address and not (options.num_workers or options.num_gpus):
            workers = None  # RayPool: one per GPU of the whole cluster
    else:
        workers = options.num_workers or (1 if options.no_ray else min(2, cores))
    if options.no_ray:
        workers = 1
    threads = 4 if device.startswith("cuda") else max(1, cores // (workers or 1))
    return device, workers, threads


def run_search(options: RunOptions, *, resume: bool) -> int:
    """Run or continue a search; returns the process exit code."""
    _check_options(options)
    config, relative_to = _load_config(options, resume)
    models = _resolve_models(config, relative_to)

    from evolve.genome import Genome
    from evolve.search import SearchDriver
    from evolve.storage import RunStorage

    genome = Genome(config.genome, _num_layers(config, models))
    storage = RunStorage(options.storage_path)
    seed = options.random_seed
    if seed is None:
        seed = int((storage.read_manifest() or {}).get("seed", 0))
    device, workers, threads = _placement(options)
    observers = _observers(options, config, seed)
    # The timeout counts from here: worker start-up is part of this session's time.
    deadline = None if options.timeout is None else time.monotonic() + options.timeout
    driver = SearchDriver(genome, storage, config, sigma0=options.sigma0,
                          popsize=options.force_population_size, seed=seed,
                          max_fevals=options.max_fevals, observers=observers, deadline=deadline)
    try:
        pool = _make_pool(options, config, genome, relative_to, device, workers, threads, seed)
        try:
            outcome = driver.run(pool)
        finally:
            pool.close()
    finally:
        for observer in observers:
            observer.close()
    _print_outcome(outcome, storage.path)
    if options.save_final_model and outcome.best_recipe is not None:
        final = _save_final_model(outcome.best_recipe, relative_to, storage.path, options, seed)
        print(f"final model: {final}")
    return 0


def _make_pool(options: RunOptions, config: Any, genome: Any, relative_to: Path, device: str,
               workers: int | None, threads: int, seed: int) -> Any:
    import numpy as np

    from evolve.evaluation import EvalSettings
    from evolve.workers import LocalPool, RayPool, WorkerSpec

    overrides: dict[str, Any] = {"task_search_paths": tuple(p.resolve() for p in options.task_search_paths),
                                 "device": device, "dtype": options.eval_dtype, "seed": seed,
                                 "share_context": options.shared_context}
    if options.batch_size is not None:
        overrides["batch_size"] = options.batch_size
    if options.vllm:
        # Engine settings: the config's `vllm:` section (defaults when absent); --batch-size,
        # when given, is lm-eval's batch size for this backend too.
        engine = config.vllm.model_dump() if config.vllm is not None else {}
        if options.batch_size is not None:
            engine["batch_size"] = options.batch_size
        overrides.update(backend="vllm", vllm=engine)
    settings = EvalSettings.from_config(config, **overrides)
    template = genome.decode(genome.initial_point(False, np.random.default_rng(0)))
    merge_device = "cuda" if (options.merge_cuda and device.startswith("cuda")) else "cpu"
    spec = WorkerSpec(template_recipe=template, settings=settings, train_tasks=list(config.tasks),
                      held_out_tasks=list(config.held_out), merge_device=merge_device,
                      threads=threads, relative_to=relative_to, seed=seed)
    if options.no_ray:
        pool = LocalPool(spec)
        if not options.quiet:
            print(f"worker: {pool.worker.merger.memory_report()}", file=sys.stderr)
        return pool
    gpus = 1 if device.startswith("cuda") else 0
    return RayPool(spec, workers, ray_address=options.ray_address, num_gpus_per_worker=gpus,
                   timeout=options.eval_timeout, report=not options.quiet)


def _observers(options: RunOptions, config: Any, seed: int) -> list[Any]:
    observers: list[Any] = []
    if not options.quiet:
        from evolve.observers.progress import ProgressObserver

        observers.append(ProgressObserver(options.max_fevals))
    if options.wandb:
        from evolve.observers.wandb_logger import WandbObserver

        observers.append(WandbObserver(config, project=options.wandb_project, entity=options.wandb_entity,
                                       run_dir=options.storage_path, seed=seed))
    return observers


def _print_outcome(outcome: Any, storage: Path) -> None:
    if outcome.best is None:
        print(f"no successful evaluation ({outcome.stop_reason}); see {storage / 'evaluations.jsonl'}")
        return
    line = f"best fitness {outcome.best['fitness']:.4f} ({outcome.best['eval_id']})"
    if outcome.best_held_out is not None:
        line += f", held-out {outcome.best_held_out['fitness']:.4f}"
    print(line)
    print(f"{outcome.evaluations} evaluations, {outcome.generations} generations, "
          f"worker busy fraction {outcome.busy_fraction:.2f}, stopped: {outcome.stop_reason}")
    print(f"best recipe: {storage / 'best_config.yaml'}")


def _save_final_model(recipe: dict, relative_to: Path, storage: Path, options: RunOptions, seed: int) -> Path:
    """Merge the best recipe to ``STORAGE/final_model`` with the streaming engine."""
    from merge_core.executor import MergeOptions, run_merge
    from merge_core.planner import plan_merge
    from merge_core.recipe import recipe_from_dict

    parsed = recipe_from_dict(recipe)
    plan = plan_merge(parsed, seed=seed, relative_to=relative_to,
                      allow_crimes=options.allow_crimes, trust_remote_code=options.trust_remote_code)
    out = storage / "final_model"
    try:
        run_merge(plan, out, (storage / "best_config.yaml").read_text(), MergeOptions())
    except OSError as err:
        raise ModelError(f"{out}: cannot write the final model: {err}") from None
    return out
