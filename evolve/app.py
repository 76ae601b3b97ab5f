"""One ``merge-evolve run``/``resume``: wire config, genome, storage, workers and observers.

Wiring only: the search is :mod:`evolve.search`, scoring :mod:`evolve.evaluation`, the
workers :mod:`evolve.workers`.  Takes a :class:`~evolve.options.RunOptions`; paths are resolved
here, at the edge, and everything below gets in-memory objects.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from evolve import signals
from evolve.lock import StorageClaim
from evolve.options import RunOptions
from evolve.storage import FINAL_MODEL
from merge_core.errors import ModelError, RecipeError
from merge_core.fsutil import refuse_overwrite

EXIT_NO_RESULT = 1  # the search ran but no candidate was scored successfully


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
        from evolve.workers.placement import cluster_address

        joining = not options.no_ray and cluster_address(options.ray_address) is not None  # as RayPool joins
        if joining and not (options.num_workers or options.num_gpus):
            workers = None  # RayPool: one per GPU of the whole cluster
    else:
        workers = options.num_workers or (1 if options.no_ray else min(2, cores))
    if options.no_ray:
        workers = 1
    threads = 4 if device.startswith("cuda") else max(1, cores // (workers or 1))
    return device, workers, threads


def run_search(options: RunOptions, *, resume: bool) -> int:
    """Run or continue a search; returns the process exit code.

    Everything that can be checked is checked before anything is written (:mod:`evolve.preflight`):
    the run directory is created only once the workers have scored the starting model.
    """
    from evolve import preflight

    # The flags themselves were checked by evolve.cli (evolve.flag_checks), before any heavy import.
    preflight.check_storage_path(options.storage_path, resume=resume)
    # The lock first: a second run on a busy storage path is refused before it starts anything.
    with StorageClaim(options.storage_path) as claim:
        return _run_claimed(options, resume, claim)


def _run_claimed(options: RunOptions, resume: bool, claim: StorageClaim) -> int:
    """:func:`run_search` once the storage path is locked (``claim``)."""
    from evolve import preflight
    from evolve.config import SearchConfig, racing_confidence_of
    from evolve.genome import Genome
    from evolve.search import SearchDriver
    from evolve.search.driver import RaceSettings
    from evolve.storage import RunStorage

    config, relative_to = preflight.load_run_config(options, resume)
    preflight.check_environment(options)
    storage = RunStorage(options.storage_path)
    stacked = None
    if config.stacking is not None:  # the data-flow space: layers re-pointed, nothing merged
        from evolve.stacking_genome import StackingGenome
        from evolve.stacking_sources import check_sources

        if options.vllm:
            raise RecipeError("--vllm", "layer stacking re-points a transformers model's layers in place: it is "
                                        "evaluated with the HF backend (drop --vllm)")
        stacked = check_sources(config.stacking, relative_to, options.storage_path)
        models = preflight.CheckedModels({}, stacked.depth, stacked.refs[0])
        genome: Any = StackingGenome(stacked.refs, stacked.depth, slots=config.stacking.slots,
                                     min_layers=config.stacking.min_layers, max_layers=config.stacking.max_layers)
    else:
        models = preflight.check_models(config, relative_to, allow_crimes=options.allow_crimes)
        if options.vllm:
            preflight.check_vllm_layout(models)
        # The run writes its files and STORAGE/final_model there: never over an input model.
        refuse_overwrite(options.storage_path / FINAL_MODEL, [(f"the input model '{ref}'", info.path)
                                                                for ref, info in models.infos.items()],
                         "--storage-path's final model folder")
        genome = Genome.for_run(config.genome, models.num_layers, storage.read_manifest())
    seed = options.random_seed
    if seed is None:
        seed = int((storage.read_manifest() or {}).get("seed", 0))
    device, workers, threads = _placement(options)
    # The timeout counts from here: worker start-up is part of this session's time.
    deadline = None if options.timeout is None else time.monotonic() + options.timeout
    search_config = config.search or SearchConfig()
    racing = search_config.racing if options.racing is None else options.racing
    race = RaceSettings(z=racing_confidence_of(config, storage.read_manifest()), fractions=tuple(search_config.racing_checks),
                        level=search_config.racing_level)
    search = {"sigma0": options.sigma0, "popsize": options.force_population_size, "seed": seed,
              "max_fevals": options.max_fevals, "deadline": deadline, "schedule": options.schedule,
              "strategy": search_config.strategy, "racing": race if racing else None}
    complete = SearchDriver(genome, storage, config, **search).check_stored_run()  # before any worker starts
    if complete is not None:  # nothing left to do: answer in seconds, no worker started
        return _answer_complete(complete, options, relative_to, seed)
    # After the stored run's check: lm-eval's import takes seconds, which a complete run does not need.
    preflight.check_task_names(config, tuple(p.resolve() for p in options.task_search_paths))
    with ExitStack() as resources:  # workers and observers, released before the final merge
        pool = _make_pool(options, config, genome, relative_to, device, workers, threads, seed, racing, stacked)
        resources.callback(pool.close)
        signals.install()  # again: ray.init replaced the SIGTERM handler with its own
        first = preflight.preflight_evaluation(pool, config, models, genome.dtype)
        if not options.quiet:
            _print_preflight(models.evaluated, first)
        # From here on the run owns its directory (locked since the start): then written.
        preflight.create_run_directory(options, relative_to)
        claim.keep()
        if stacked is not None:
            from evolve.stacking_sources import materialize

            materialize(stacked, relative_to, seed)  # recipe sources, where the recipes name them
        if options.baselines:  # the parents and the equal merge, scored once (stored: reused)
            from evolve.baselines import score_baselines

            score_baselines(pool, storage, config, models, genome, first, quiet=options.quiet)
        observers = _observers(options, config, seed)  # W&B writes into the run directory
        for observer in observers:
            resources.callback(observer.close)
        outcome = SearchDriver(genome, storage, config, observers=observers, **search).run(pool)
    _print_outcome(outcome, storage)
    if outcome.best_recipe is None:
        return EXIT_NO_RESULT
    if options.save_final_model:
        final = _save_final_model(outcome.best_recipe, relative_to, storage.path, options, seed)
        print(f"final model: {final}")
    return 0


def _print_preflight(model: str, results: dict[str, Any]) -> None:
    parts = [f"{name} " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(r.scores.items()))
             for name, r in results.items()]
    print(f"preflight: '{model}' scored on {'; '.join(parts)}", file=sys.stderr)


def _make_pool(options: RunOptions, config: Any, genome: Any, relative_to: Path, device: str,
               workers: int | None, threads: int, seed: int, racing: bool, stacked: Any = None) -> Any:
    import numpy as np

    from evolve.config import fewshot_seed_of
    from evolve.evaluation import EvalSettings
    from evolve.storage import RunStorage
    from evolve.workers import LocalPool, RayPool, WorkerSpec

    # Evaluation is seeded by the few-shot seed (lm-eval's 1234 by default), not the search seed.
    eval_seed = fewshot_seed_of(config, RunStorage(options.storage_path).read_manifest())
    overrides: dict[str, Any] = {"task_search_paths": tuple(p.resolve() for p in options.task_search_paths),
                                 "device": device, "dtype": options.eval_dtype, "seed": eval_seed,
                                 "share_context": options.shared_context,
                                 "trust_remote_code": options.trust_remote_code}
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
                      threads=threads, relative_to=relative_to, seed=seed, allow_crimes=options.allow_crimes,
                      racing=racing, stacking=stacked.spec if stacked is not None else None,
                      model_dir=stacked.model_dir if stacked is not None else None)
    if options.no_ray:
        pool = LocalPool(spec)
        if not options.quiet:
            print(f"worker: {pool.worker.memory_report()}", file=sys.stderr)
        return pool
    gpus = 1 if device.startswith("cuda") else 0
    return RayPool(spec, workers, ray_address=options.ray_address, num_gpus_per_worker=gpus,
                   timeout=options.eval_timeout, report=not options.quiet)


def _observers(options: RunOptions, config: Any, seed: int) -> list[Any]:
    from evolve.observers.html_report import HtmlReportObserver

    observers: list[Any] = [HtmlReportObserver(options.storage_path)]  # STORAGE/report.html
    if not options.quiet:
        from evolve.observers.progress import ProgressObserver

        observers.append(ProgressObserver(options.max_fevals))
    if options.wandb:
        from evolve.observers.wandb_logger import WandbObserver

        observers.append(WandbObserver(config, project=options.wandb_project, entity=options.wandb_entity,
                                       run_dir=options.storage_path, seed=seed))
    return observers


def _print_outcome(outcome: Any, storage: Any) -> None:
    from evolve.summary import outcome_lines

    print("\n".join(outcome_lines(outcome, storage.path, storage.load_evaluations(repair=False))))
    if outcome.best is not None and outcome.best.get("violation"):  # floors (tasks[i].min) none met
        print(f"no candidate met every floor: the best is the closest (violation {outcome.best['violation']:.4f})")
    if (storage.path / "pareto" / "pareto.json").exists():  # search.objectives: pareto (evolve.pareto_export)
        print(f"pareto front: {storage.path / 'pareto'} (merge-evolve report lists it)")


def _answer_complete(outcome: Any, options: RunOptions, relative_to: Path, seed: int) -> int:
    """A rerun of a complete run: say so and how to extend it; merge the final model only if
    it is missing or not the best recipe's (a run killed during that merge)."""
    from evolve.storage import RunStorage
    from evolve.summary import complete_lines

    storage = RunStorage(options.storage_path)
    print("\n".join(complete_lines(outcome, storage.path, storage.load_evaluations(repair=False),
                                   options.max_fevals)))
    if outcome.best_recipe is None:
        return EXIT_NO_RESULT
    if options.save_final_model:
        final = storage.path / FINAL_MODEL
        try:
            current = (final / "mergekit_config.yml").read_text() == (storage.path / "best_config.yaml").read_text()
        except OSError:
            current = False
        if not current:  # the storage path is locked since run_search began
            final = _save_final_model(outcome.best_recipe, relative_to, storage.path, options, seed)
        print(f"final model: {final}")
    return 0


def _save_final_model(recipe: dict, relative_to: Path, storage: Path, options: RunOptions, seed: int) -> Path:
    """Merge the best recipe to ``STORAGE/final_model`` with the streaming engine."""
    from merge_core.executor import MergeOptions, run_merge
    from merge_core.planner import plan_merge
    from merge_core.recipe import recipe_from_dict

    parsed = recipe_from_dict(recipe)
    plan = plan_merge(parsed, seed=seed, relative_to=relative_to,
                      allow_crimes=options.allow_crimes, trust_remote_code=options.trust_remote_code)
    out = storage / FINAL_MODEL
    try:
        run_merge(plan, out, (storage / "best_config.yaml").read_text(), MergeOptions())
    except OSError as err:
        raise ModelError(f"{out}: cannot write the final model: {err}") from None
    return out
