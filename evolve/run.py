"""One ``merge-evolve run``/``resume``: wire config, genome, storage, workers and observers."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from merge_core.errors import ModelError, RecipeError

STORED_CONFIG = "config.yml"


def _load_config(args: argparse.Namespace, resume: bool) -> tuple[Any, Path]:
    """The evolve config and the folder its relative model paths are resolved against."""
    from evolve.config import load_evolve_config
    from evolve.storage import atomic_write

    stored = args.storage_path / STORED_CONFIG
    if resume:
        if not stored.exists():
            raise RecipeError("--storage-path", f"no run to resume in '{args.storage_path}' (no {STORED_CONFIG})")
        source = Path((args.storage_path / "config_dir.txt").read_text().strip())
        return load_evolve_config(stored), source
    config = load_evolve_config(args.config)
    args.storage_path.mkdir(parents=True, exist_ok=True)
    if not stored.exists():
        atomic_write(stored, args.config.read_bytes())
        atomic_write(args.storage_path / "config_dir.txt", str(Path.cwd()).encode())
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


def _check_unsupported(args: argparse.Namespace) -> None:
    if args.load_in_8bit or args.load_in_4bit:
        raise RecipeError("--load-in-8bit/--load-in-4bit", "quantized evaluation is not supported")
    if args.vllm:
        from evolve.vllm_evaluation import VLLM_MISSING, vllm_available  # light: imports no vllm

        if not vllm_available():
            raise RecipeError("--vllm", VLLM_MISSING)
    for flag, value in (("--max-fevals", args.max_fevals), ("--num-workers", args.num_workers or 1)):
        if value < 1:
            raise RecipeError(flag, f"must be >= 1, got {value}")


def _placement(args: argparse.Namespace) -> tuple[str, int | None, int]:
    """(device, workers, torch threads per worker): one worker per GPU (None: per GPU of the
    Ray cluster being joined, counted once connected), else share the cores."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cores = os.cpu_count() or 1
    if device.startswith("cuda"):
        gpus = args.num_gpus or torch.cuda.device_count()
        workers = args.num_workers or max(gpus, 1)
        if args.ray_address and not (args.num_workers or args.num_gpus):
            workers = None  # type: ignore[assignment]  # RayPool: one per GPU of the whole cluster
    else:
        workers = args.num_workers or (1 if args.no_ray else min(2, cores))
    if args.no_ray:
        workers = 1
    return device, workers, max(1, cores // workers) if not device.startswith("cuda") else 4


def run_search(args: argparse.Namespace, *, resume: bool) -> int:
    """Run or continue a search; returns the process exit code."""
    _check_unsupported(args)
    config, relative_to = _load_config(args, resume)
    models = _resolve_models(config, relative_to)

    from evolve.genome import Genome
    from evolve.search import SearchDriver
    from evolve.storage import RunStorage

    genome = Genome(config.genome, _num_layers(config, models))
    storage = RunStorage(args.storage_path)
    if args.random_seed is None:
        args.random_seed = int((storage.read_manifest() or {}).get("seed", 0))
    device, workers, threads = _placement(args)
    observers = _observers(args, config)
    driver = SearchDriver(genome, storage, config, sigma0=args.sigma0,
                          popsize=args.force_population_size, seed=args.random_seed,
                          max_fevals=args.max_fevals, observers=observers)
    if args.timeout is not None:
        driver.deadline = time.monotonic() + args.timeout
    pool = _make_pool(args, config, genome, relative_to, device, workers, threads)
    try:
        outcome = driver.run(pool)
    finally:
        pool.close()
        for observer in observers:
            getattr(observer, "close", lambda: None)()
    _print_outcome(outcome, storage.path)
    if args.save_final_model and outcome.best_recipe is not None:
        final = _save_final_model(outcome.best_recipe, relative_to, storage.path, args)
        print(f"final model: {final}")
    return 0


def _make_pool(args: argparse.Namespace, config: Any, genome: Any, relative_to: Path, device: str,
               workers: int | None, threads: int) -> Any:
    import numpy as np

    from evolve.evaluation import EvalSettings
    from evolve.workers import LocalPool, RayPool, WorkerSpec

    overrides: dict[str, Any] = {"task_search_paths": tuple(p.resolve() for p in args.task_search_path),
                                 "device": device, "dtype": args.eval_dtype, "seed": args.random_seed,
                                 "share_context": getattr(args, "shared_context", True)}
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    if args.vllm:
        # Engine settings: the config's `vllm:` section (defaults when absent); --batch-size,
        # when given, is lm-eval's batch size for this backend too.
        engine = config.vllm.model_dump() if config.vllm is not None else {}
        if args.batch_size is not None:
            engine["batch_size"] = args.batch_size
        overrides.update(backend="vllm", vllm=engine)
    settings = EvalSettings.from_config(config, **overrides)
    template = genome.decode(genome.initial_point(False, np.random.default_rng(0)))
    merge_device = "cuda" if (args.merge_cuda and device.startswith("cuda")) else "cpu"
    spec = WorkerSpec(template_recipe=template, settings=settings, train_tasks=list(config.tasks),
                      held_out_tasks=list(config.held_out), merge_device=merge_device,
                      threads=threads, relative_to=relative_to, seed=args.random_seed)
    if args.no_ray:
        pool = LocalPool(spec)
        if not args.quiet:
            print(f"worker: {pool.worker.merger.memory_report()}", file=sys.stderr)
        return pool
    gpus = 1 if device.startswith("cuda") else 0
    return RayPool(spec, workers, ray_address=args.ray_address, num_gpus_per_worker=gpus,
                   timeout=args.eval_timeout, report=not args.quiet)


def _observers(args: argparse.Namespace, config: Any) -> list[Any]:
    observers: list[Any] = []
    if not args.quiet:
        from evolve.progress import ProgressObserver

        observers.append(ProgressObserver(args.max_fevals))
    if args.wandb:
        from evolve.wandb_logger import WandbObserver

        observers.append(WandbObserver(config, project=args.wandb_project, entity=args.wandb_entity,
                                       run_dir=args.storage_path, seed=args.random_seed))
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


def _save_final_model(recipe: dict, relative_to: Path, storage: Path, args: argparse.Namespace) -> Path:
    """Merge the best recipe to ``STORAGE/final_model`` with the streaming engine."""
    from merge_core.executor import MergeOptions, run_merge
    from merge_core.planner import plan_merge
    from merge_core.recipe import recipe_from_dict

    parsed = recipe_from_dict(recipe)
    plan = plan_merge(parsed, seed=args.random_seed, relative_to=relative_to,
                      allow_crimes=args.allow_crimes, trust_remote_code=args.trust_remote_code)
    out = storage / "final_model"
    try:
        run_merge(plan, out, (storage / "best_config.yaml").read_text(), MergeOptions())
    except OSError as err:
        raise ModelError(f"{out}: cannot write the final model: {err}") from None
    return out
