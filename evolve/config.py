"""The evolve config: mergekit-evolve's YAML schema, accepted unchanged, plus our additions.

mergekit-evolve fields (same names and defaults as mergekit 0.1.5's ``EvolMergeConfiguration``):

- ``genome``: ``models``, ``merge_method``, ``base_model``, ``tokenizer_source``,
  ``layer_granularity`` (0), ``normalize`` (None = method default), ``allow_negative_weights``
  (False), ``filters`` (None), ``smooth`` (False).
- ``tasks``: a list of ``{name, weight (1.0), metric ("acc,none")}`` or plain task names.
- ``limit``, ``num_fewshot`` (None), ``shuffle`` (False), ``random_init`` (False),
  ``apply_chat_template`` (True), ``fewshot_as_multiturn`` (True).

Ours: ``held_out`` (tasks re-scored on the best candidates, never optimised), a per-task
``split`` (lm-eval split override) and ``min`` (a floor, :mod:`evolve.search.objectives`),
``search:`` (strategy, ``objectives: pareto``, racing) and a ``vllm:`` section (engine settings, used by the
evaluation side). Unknown keys are errors (mergekit silently ignored them).

Every problem is reported as one :class:`~merge_core.errors.RecipeError` whose path is the YAML
path of the field (``genome.models[2]``, ``tasks[0].weight``).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from evolve.genes import BASE_METHODS, METHOD_GENES, NOTHING_TO_SEARCH, SEARCHABLE
from merge_core.errors import RecipeError
from merge_core.yaml_io import load_yaml_mapping, short_repr

# BASE_METHODS and METHOD_GENES (what can be searched, per merge method) are defined in
# evolve.genes and stay importable from here.

VLLM_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenomeConfig(_Strict):
    """What is searched: the models, the merge method and the genome's layout."""

    models: list[str]
    merge_method: str
    base_model: Optional[str] = None
    tokenizer_source: Optional[str] = None
    # mergekit's `tokenizer:` section (source, tokens, pad_to_multiple_of), copied into every
    # candidate recipe; checked with merge_core's recipe model (_check_genome).
    tokenizer: Optional[dict[str, Any]] = None
    layer_granularity: int = 0
    normalize: Optional[bool] = None
    allow_negative_weights: bool = False
    filters: Optional[list[str]] = None
    smooth: bool = False
    # Ours: the search box of each gene, [low, high] (None: the method's default; see
    # evolve/genome.py). Weights of the task-vector methods may exceed 1.
    weight_range: Optional[tuple[float, float]] = None
    density_range: Optional[tuple[float, float]] = None


class TaskConfig(_Strict):
    """One lm-eval task; its ``metric`` value times ``weight`` adds to the fitness."""

    name: str
    weight: float = 1.0
    metric: str = "acc,none"
    split: Optional[str] = None
    # Ours: a floor on the metric (a constraint, in either objectives mode): a candidate scoring
    # below it is infeasible (evolve.search.objectives). Search tasks only.
    min: Optional[float] = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        # mergekit-evolve accepts a bare task name as shorthand.
        return {"name": value} if isinstance(value, str) else value


class VllmConfig(_Strict):
    """vLLM engine settings for the evaluation workers (defaults as mergekit-evolve's)."""

    gpu_memory_utilization: float = 0.8
    max_model_len: Optional[int] = 4096
    dtype: Optional[str] = None
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    max_num_seqs: Optional[int] = None
    batch_size: Union[int, str] = "auto"  # an int or "auto", checked in _check_semantics


class StackingConfig(_Strict):
    """Layer stacking (ours; the data-flow space, :mod:`evolve.stacking_genome`): which layers,
    from which source, in which order.

    ``sources``: model references, or recipe files (``.yml``/``.yaml``, e.g. an earlier run's
    ``best_config.yaml``: merged once, then stacked); ``slots``: the output's layer slots (None:
    the sources' depth); ``min_layers``/``max_layers``: bounds on the layers used (None: slots).
    """

    sources: list[str]
    slots: Optional[int] = None
    min_layers: int = 1
    max_layers: Optional[int] = None


class SearchConfig(_Strict):
    """How the genome is searched (ours): the strategy and racing on documents.

    ``strategy``: a name of :data:`evolve.search.strategies.STRATEGIES` (None: the default).
    ``racing``: score candidates on growing subsets of the documents and stop those that cannot
    reach ``racing_level`` (:mod:`evolve.racing`): ``incumbent`` (the best so far) or ``cut``
    (the latest tell's best half); ``racing_confidence``: the z of its upper bound (None:
    :func:`racing_confidence_of`);
    ``racing_checks``: the fractions of the documents after which it checks.
    ``initial_design``: evaluations of the space-filling start before CMA-ES
    (:mod:`evolve.search.design`); None: two populations for the CMA-ES strategies on a
    parameter space, none for tpe and for stacking; 0: off.
    """

    strategy: Optional[str] = None
    # "weighted" (None: the default): maximize the weighted sum of the tasks; "pareto": each task
    # is an objective, the run keeps the non-dominated front (evolve.search.objectives).
    objectives: Optional[Literal["weighted", "pareto"]] = None
    initial_design: Optional[int] = None
    racing: bool = True
    racing_level: Literal["incumbent", "cut"] = "incumbent"
    racing_confidence: Optional[float] = None  # None: racing_confidence_of
    racing_checks: list[float] = [0.125, 0.25, 0.5]


class EvolveConfig(_Strict):
    """A whole evolve config file."""

    genome: Optional[GenomeConfig] = None  # parameter space; exactly one of genome and stacking
    stacking: Optional[StackingConfig] = None
    tasks: list[TaskConfig]
    held_out: list[TaskConfig] = []
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    shuffle: bool = False
    random_init: bool = False
    apply_chat_template: bool = True
    fewshot_as_multiturn: bool = True
    # Ours: lm-eval's few-shot sampling seed (None: lm-eval's default, FEWSHOT_SEED); see
    # fewshot_seed_of. Not the search seed: the objective must not change with --random-seed.
    fewshot_seed: Optional[int] = None
    vllm: Optional[VllmConfig] = None
    search: Optional[SearchConfig] = None


def load_evolve_config(path: str | Path) -> EvolveConfig:
    """Read and validate an evolve config YAML; raise a one-line RecipeError on any problem."""
    return parse_evolve_config(load_yaml_mapping(Path(path), "evolve config"))


def parse_evolve_config(data: Any) -> EvolveConfig:
    """Validate an already-parsed evolve config (a dict as loaded from YAML)."""
    if not isinstance(data, dict):
        raise RecipeError("", f"an evolve config must be a mapping, got {type(data).__name__}")
    try:
        config = EvolveConfig.model_validate(data)
    except ValidationError as exc:
        raise _one_line(exc) from None
    _check_semantics(config)
    return config


def _yaml_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _one_line(exc: ValidationError) -> RecipeError:
    """Turn pydantic's multi-error report into one RecipeError about the first problem."""
    errors = exc.errors()
    # Unknown keys: name all of them at their parent, it is the likeliest typo.
    extra = [e for e in errors if e["type"] == "extra_forbidden"]
    if extra:
        parent = extra[0]["loc"][:-1]
        keys = [str(e["loc"][-1]) for e in extra if e["loc"][:-1] == parent]
        return RecipeError(_yaml_path(parent), "unknown key(s) " + ", ".join(map(repr, keys)))
    first = errors[0]
    # Drop pydantic's internal union/validator tags from the location.
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and ("[" in p or "-" in p)))
    msg = first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if "input" in first and first["type"] not in ("missing",):
        msg += f" (got {short_repr(first['input'])})"
    return RecipeError(_yaml_path(loc), msg)


def _check_semantics(config: EvolveConfig) -> None:
    """Cross-field checks pydantic's types cannot express, each with its exact YAML path."""
    if (config.genome is None) == (config.stacking is None):
        raise RecipeError("genome", "give exactly one of genome (parameter space) and stacking (layer stacking)")
    if config.genome is not None:
        _check_genome(config.genome)
    else:
        assert config.stacking is not None
        _check_stacking(config.stacking)
    _check_tasks(config)


def _check_references(field: str, refs: list[str], what: str) -> None:
    """At least one, none empty, none twice (a repeated model would be counted twice)."""
    if not refs:
        raise RecipeError(field, f"at least one {what} is required")
    seen: dict[str, int] = {}
    for i, ref in enumerate(refs):
        if not ref.strip():
            raise RecipeError(f"{field}[{i}]", f"empty {what} reference")
        if ref in seen:
            raise RecipeError(f"{field}[{i}]", f"{short_repr(ref)} is already {field}[{seen[ref]}]")
        seen[ref] = i


def _check_tokenizer_section(g: GenomeConfig) -> None:
    """``genome.tokenizer`` as merge_core reads a recipe's ``tokenizer:`` section."""
    from merge_core.recipe import TokenizerSection

    if g.tokenizer_source is not None:
        raise RecipeError("genome.tokenizer", "give either tokenizer_source or tokenizer, not both")
    try:
        TokenizerSection.model_validate(g.tokenizer)
    except ValidationError as exc:
        err = _one_line(exc)
        raise RecipeError(f"genome.tokenizer.{err.path}" if err.path else "genome.tokenizer", err.message) from None


def _check_stacking(s: StackingConfig) -> None:
    _check_references("stacking.sources", s.sources, "source")
    if s.slots is not None and s.slots < 1:
        raise RecipeError("stacking.slots", f"must be >= 1, got {s.slots}")
    if s.min_layers < 1:
        raise RecipeError("stacking.min_layers", f"must be >= 1, got {s.min_layers}")
    if s.max_layers is not None and s.max_layers < s.min_layers:
        raise RecipeError("stacking.max_layers", f"must be >= min_layers ({s.min_layers}), got {s.max_layers}")
    if s.slots is not None:
        for name in ("min_layers", "max_layers"):
            value = getattr(s, name)
            if value is not None and value > s.slots:
                raise RecipeError(f"stacking.{name}", f"must be <= slots ({s.slots}), got {value}")


def _check_genome(g: GenomeConfig) -> None:
    _check_references("genome.models", g.models, "model")
    if g.merge_method not in METHOD_GENES:
        why = NOTHING_TO_SEARCH.get(g.merge_method)
        raise RecipeError(
            "genome.merge_method",
            f"unsupported method {g.merge_method!r}{': nothing to search: ' + why if why else ''}; "
            f"choose one of {', '.join(METHOD_GENES)}",
        )
    if g.base_model is not None and not g.base_model.strip():
        raise RecipeError("genome.base_model", "empty model reference")
    if g.merge_method in BASE_METHODS and g.base_model is None:
        raise RecipeError("genome.base_model", f"required for merge_method {g.merge_method}")
    if g.layer_granularity < 0:
        raise RecipeError("genome.layer_granularity", f"must be >= 0 (0 = one group), got {g.layer_granularity}")
    if g.filters is not None:
        for i, f in enumerate(g.filters):
            if not f.strip():
                raise RecipeError(f"genome.filters[{i}]", "empty filter")
            if f in g.filters[:i]:
                raise RecipeError(f"genome.filters[{i}]", f"duplicate filter {f!r}")
    if g.merge_method == "slerp":
        if len(g.models) < 2:
            raise RecipeError("genome.models", "slerp needs at least two models")
        if g.smooth:
            raise RecipeError("genome.smooth", "not supported with merge_method slerp")
        if g.filters:
            raise RecipeError("genome.filters", "not supported with merge_method slerp")
    _check_model_count(g)
    # slerp ignores it, as mergekit-evolve did (configs written for it keep loading).
    if g.normalize is not None and g.merge_method not in NORMALIZED_METHODS | {"slerp"}:
        raise RecipeError("genome.normalize", f"merge_method {g.merge_method} has no normalize parameter")
    if g.tokenizer_source is not None and not g.tokenizer_source.strip():
        raise RecipeError("genome.tokenizer_source", "empty value")
    if g.tokenizer is not None:
        _check_tokenizer_section(g)
    _check_ranges(g)


# Methods whose recipes take ``genome.normalize`` (multislerp as ``normalize_weights``).
NORMALIZED_METHODS = frozenset({"linear", "multislerp"} | {m for m, s in SEARCHABLE.items() if s.task_vectors})


def _check_model_count(g: GenomeConfig) -> None:
    """mergekit's input contract for the models besides the base (nearswap: exactly one)."""
    low, high = SEARCHABLE[g.merge_method].others
    if g.merge_method == "slerp":
        return  # its own message below
    others = [m for m in g.models if m != g.base_model]
    if high is not None and low == high and len(others) != low:
        noun = "model" if low == 1 else "models"
        raise RecipeError("genome.models", f"merge_method {g.merge_method} takes exactly {low} {noun} besides "
                                           f"its base_model, got {len(others)}")
    if len(others) < low:
        raise RecipeError("genome.models", f"merge_method {g.merge_method} needs at least {low} model(s) "
                                           f"besides its base_model, got {len(others)}")


def _check_tasks(config: EvolveConfig) -> None:
    if not config.tasks:
        raise RecipeError("tasks", "at least one task is required")
    for key in ("tasks", "held_out"):
        tasks: list[TaskConfig] = getattr(config, key)
        pairs: dict[tuple[str, str], int] = {}
        for i, task in enumerate(tasks):
            if not task.name.strip():
                raise RecipeError(f"{key}[{i}].name", "empty task name")
            if not task.metric.strip():
                raise RecipeError(f"{key}[{i}].metric", "empty metric")
            if not math.isfinite(task.weight):
                raise RecipeError(f"{key}[{i}].weight", f"must be a finite number, got {task.weight}")
            if task.split is not None and not task.split.strip():
                raise RecipeError(f"{key}[{i}].split", "empty split name")
            if task.min is not None and (key == "held_out" or not math.isfinite(task.min)):
                raise RecipeError(f"{key}[{i}].min", "a floor must be a finite number" if key == "tasks" else
                                  "floors apply to the search tasks only (held-out tasks are never optimised)")
            pair = (task.name, task.metric)
            if pair in pairs:
                raise RecipeError(
                    f"{key}[{i}]", f"task {task.name!r} metric {task.metric!r} repeats {key}[{pairs[pair]}]"
                )
            pairs[pair] = i
    if all(t.weight == 0 for t in config.tasks):
        raise RecipeError("tasks", "all task weights are 0: the fitness would be constant")
    if config.limit is not None and config.limit < 1:
        raise RecipeError("limit", f"must be >= 1, got {config.limit}")
    if config.num_fewshot is not None and config.num_fewshot < 0:
        raise RecipeError("num_fewshot", f"must be >= 0, got {config.num_fewshot}")
    if config.fewshot_seed is not None and not 0 <= config.fewshot_seed < 2**32:  # numpy's seed range
        raise RecipeError("fewshot_seed", f"must be in [0, 2**32), got {config.fewshot_seed}")

    _check_search(config.search, len(config.tasks))

    v = config.vllm
    if v is not None:
        if not 0 < v.gpu_memory_utilization <= 1:
            raise RecipeError("vllm.gpu_memory_utilization", f"must be in (0, 1], got {v.gpu_memory_utilization}")
        for name in ("max_model_len", "max_num_seqs", "tensor_parallel_size"):
            value = getattr(v, name)
            if value is not None and value < 1:
                raise RecipeError(f"vllm.{name}", f"must be >= 1, got {value}")
        if v.tensor_parallel_size != 1:  # refused here, not when the first worker builds its engine
            raise RecipeError("vllm.tensor_parallel_size", f"must be 1 (got {v.tensor_parallel_size}): candidate "
                              "weights are pushed into an in-process engine; run one worker per GPU instead")
        if isinstance(v.batch_size, bool) or (isinstance(v.batch_size, int) and v.batch_size < 1) or (
            isinstance(v.batch_size, str) and v.batch_size != "auto"
        ):
            raise RecipeError("vllm.batch_size", f"must be >= 1 or 'auto', got {v.batch_size}")
        if v.dtype is not None and v.dtype not in VLLM_DTYPES:
            raise RecipeError("vllm.dtype", f"unknown dtype {v.dtype!r}; choose one of {', '.join(VLLM_DTYPES)}")


# The search strategies' names (evolve.search.strategies maps them to classes; defined here so
# that validating a config imports no optimizer).
STRATEGY_NAMES = ("cmaes", "ipop-cmaes", "tpe")
# The multi-objective ones (search.objectives: pareto; evolve.search.mo_strategies).
MO_STRATEGY_NAMES = ("chebyshev-cmaes", "mo-tpe", "nsga2")
# The default with objectives: pareto (scripts/bench_pareto.py: the largest hypervolume on the toy zoo).
DEFAULT_MO_STRATEGY = "mo-tpe"


def _check_search(s: SearchConfig | None, num_tasks: int) -> None:
    if s is None:
        return
    pareto = s.objectives == "pareto"
    names = MO_STRATEGY_NAMES if pareto else STRATEGY_NAMES
    if s.strategy is not None and s.strategy not in names:
        other = "weighted" if pareto else "pareto"
        hint = f" ({s.strategy} is for search.objectives: {other})" if s.strategy in STRATEGY_NAMES + MO_STRATEGY_NAMES \
            else ""
        raise RecipeError("search.strategy", f"unknown strategy {s.strategy!r}; choose one of {', '.join(names)}{hint}")
    if pareto and num_tasks < 2:
        raise RecipeError("search.objectives", "pareto needs at least two tasks (each task is an objective)")
    if s.initial_design is not None and s.initial_design < 0:
        raise RecipeError("search.initial_design", f"must be a number of evaluations >= 0, got {s.initial_design}")
    strategy = s.strategy or (DEFAULT_MO_STRATEGY if pareto else None)
    if s.initial_design and strategy in ("tpe", "mo-tpe", "nsga2"):
        raise RecipeError("search.initial_design", f"{strategy} takes no initial design (its first trials are its own "
                          "random design): leave it out or set 0")
    if s.racing_confidence is not None and not (math.isfinite(s.racing_confidence) and s.racing_confidence > 0):
        raise RecipeError("search.racing_confidence", f"must be a number > 0, got {s.racing_confidence}")
    checks = list(s.racing_checks)
    if not checks or any(not 0 < f < 1 for f in checks) or sorted(set(checks)) != checks:
        raise RecipeError("search.racing_checks", f"must be increasing fractions in (0, 1), got {checks}")


def _check_ranges(g: GenomeConfig) -> None:
    genes = METHOD_GENES[g.merge_method]
    for name, gene, limits in (("weight_range", "weight", (-math.inf, math.inf)), ("density_range", "density", (0, 1))):
        value = getattr(g, name)
        if value is None:
            continue
        where = f"genome.{name}"
        if gene not in genes:
            raise RecipeError(where, f"merge_method {g.merge_method} has no {gene} gene")
        lo, hi = value
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
            raise RecipeError(where, f"expected [low, high] with low < high, got {list(value)}")
        if lo < limits[0] or hi > limits[1]:
            raise RecipeError(where, f"must lie within [{limits[0]}, {limits[1]}], got {list(value)}")
        if gene == "weight" and lo < 0 and not g.allow_negative_weights:
            raise RecipeError(where, f"a negative low ({lo}) needs allow_negative_weights: true")


# Fields added after 0.1 whose None means "the default": left out of the normalized form when
# None, so configs written before them hash (and resume) as they did.
_OPTIONAL_SINCE_0_2 = {"genome": ("weight_range", "density_range", "tokenizer"),
                       "search": ("initial_design", "racing_confidence", "objectives"),
                       "": ("search", "fewshot_seed", "stacking")}

FEWSHOT_SEED = 1234
"""lm-eval's default few-shot (and numpy/torch) seed, which mergekit-evolve runs with too."""


def fewshot_seed_of(config: EvolveConfig, manifest: dict[str, Any] | None) -> int:
    """The seed a run evaluates with (lm-eval's few-shot sampler, numpy, torch, the document
    shuffle): the config's ``fewshot_seed``, else the stored run's (``manifest``: its run.json),
    else :data:`FEWSHOT_SEED`.  A run stored before the seed was recorded evaluated with its
    search seed, and keeps doing so on resume (its scores stay comparable)."""
    if config.fewshot_seed is not None:
        return int(config.fewshot_seed)
    if manifest is not None:
        return int(manifest.get("fewshot_seed", manifest.get("seed", FEWSHOT_SEED)))
    return FEWSHOT_SEED


def racing_confidence_of(config: EvolveConfig, manifest: dict[str, Any] | None) -> float:
    """Racing's z: the config's ``search.racing_confidence``, else the stored run's (``manifest``:
    its run.json), else :data:`evolve.racing.DEFAULT_Z`.  A run stored before the value was
    recorded raced at :data:`evolve.racing.LEGACY_Z` (the default then) and keeps it on resume."""
    from evolve.racing import DEFAULT_Z, LEGACY_Z

    if config.search is not None and config.search.racing_confidence is not None:
        return float(config.search.racing_confidence)
    if manifest is not None:
        return float(manifest.get("racing_confidence", LEGACY_Z))
    return DEFAULT_Z


def normalized_config(config: EvolveConfig) -> dict[str, Any]:
    """The config as plain JSON data with every default filled in (the hashed form)."""
    data = config.model_dump(mode="json")
    for task in data["tasks"] + data["held_out"]:
        if task.get("min", 0) is None:  # floors came after 0.2
            del task["min"]
    for section, keys in _OPTIONAL_SINCE_0_2.items():
        where = (data.get(section) or {}) if section else data
        for key in keys:
            if where.get(key, 0) is None:
                del where[key]
    return data


def canonical_json(data: Any) -> str:
    """Key-sorted, compact JSON: equal data gives equal text on every run and machine."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def config_hash(config: EvolveConfig) -> str:
    """sha256 of the normalized config (provenance; shorthand and defaults hash alike)."""
    return hashlib.sha256(canonical_json(normalized_config(config)).encode()).hexdigest()
