"""The options of one ``merge-evolve run``/``resume``, typed and frozen.

:mod:`evolve.cli` builds a :class:`RunOptions` from the command line once; everything below it
(:mod:`evolve.app` and what it wires) reads these fields and never sees argparse.  Defaults are
mergekit-evolve's where the option is one of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_SIGMA0 = 1 / 6
DEFAULT_MAX_FEVALS = 100


@dataclass(frozen=True)
class RunOptions:
    """What the user asked for on the command line (see ``merge-evolve --help``).

    ``config`` is None for ``resume`` (the stored config is used); ``random_seed`` None means
    0 for a new run, the stored run's seed when resuming.
    """

    storage_path: Path
    config: Path | None = None
    max_fevals: int = DEFAULT_MAX_FEVALS
    vllm: bool = False
    num_gpus: int | None = None
    merge_cuda: bool = True
    batch_size: int | None = None
    sigma0: float = DEFAULT_SIGMA0
    random_seed: int | None = None
    wandb: bool = False
    wandb_project: str | None = None
    wandb_entity: str | None = None
    task_search_paths: tuple[Path, ...] = ()
    save_final_model: bool = True
    timeout: float | None = None
    force_population_size: int | None = None
    trust_remote_code: bool = False
    allow_crimes: bool = False
    num_workers: int | None = None
    ray_address: str | None = None
    no_ray: bool = False
    device: str | None = None
    eval_dtype: str | None = None
    shared_context: bool = True
    eval_timeout: float | None = None
    quiet: bool = False
    schedule: str | None = None  # "sync", "async", None: the stored run's, else async
    racing: bool | None = None  # None: the config's search.racing (on by default)
    baselines: bool = True  # score the input models and the equal merge at start (evolve.baselines)
