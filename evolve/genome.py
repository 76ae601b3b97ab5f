"""The genome: a flat vector of floats that CMA-ES searches, and its mergekit recipe.

Layout (the same ordering as mergekit-evolve, so its genotypes mean the same here)::

    x has shape (G, M, F, P), flattened in C order:
    x[((g * M + m) * F + f) * P + p]

- G layer groups: ``ceil(L / layer_granularity)`` groups of ``layer_granularity`` consecutive
  layers (``layer_granularity: 0`` = one group of all L layers). mergekit-evolve requires the
  granularity to divide L; we accept any, the last group is then shorter.
- M models: ``genome.models`` in order. For the task-vector methods the base model is not a
  gene-carrying model unless it is also listed in ``models`` (mergekit-evolve's rule); it is added
  to every slice as the parameter-less base source.
- F filter sets: one per ``genome.filters`` entry plus a catch-all, in that order; each becomes a
  conditional parameter ``[{filter: f, value: v}, ..., {value: v_catchall}]``. F = 1 without
  filters, and the parameters are plain numbers.
- P genes per (group, model, filter set), by method (:data:`evolve.genes.SEARCHABLE`)::

    linear, task_arithmetic, multislerp, nuslerp          weight
    ties, dare_ties, dare_linear, breadcrumbs,
    della, della_linear                                   weight, density
    breadcrumbs_ties                                      weight, density, gamma
    slerp                                                 t-score (one per model)
    sce                                                   select_topk          (global)
    nearswap                                              log10 t              (global)
    ram                                                   log10 epsilon        (global)
    ramplus_tl                                            r, alpha             (global)

  Global genes are the recipe's parameters, not a model's: M = 1 for them, and they are written
  as each slice's ``parameters`` (``smooth``: gradients in the top-level ``parameters``), the
  models carrying none. dimension = G * M * F * P.
- Model counts as in mergekit: nuslerp takes exactly two models besides the base, nearswap
  exactly one (the config refuses others); multislerp and nuslerp merge task vectors when
  ``genome.base_model`` is given, the models themselves otherwise. karcher and arcee_fusion
  have nothing to search in mergekit 0.1.5 (no per-model parameter) and are refused.

Bounds: the search box (CMA-ES runs inside it; decode maps points outside it back in):

- weight: ``genome.weight_range``; by default [0, 2] for the task-vector methods
  (task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della,
  della_linear: a task vector may well be worth more than once; the toy zoo's best global
  weights are 1.5) and [0, 1] for linear, multislerp and nuslerp (normalized, so only ratios
  matter); with ``allow_negative_weights`` the default low is minus the high.  Outside:
  ``|w|`` unless negatives are allowed (mergekit-evolve's map), then clipped into the box.
- density: ``genome.density_range``, default [0, 1] (outside: ``clamp(|d|, low, high)``).
- The other genes have fixed boxes (outside: ``clamp(|v|, low, high)``; log genes clamped):
  gamma [0, 0.1], start 0.01 (mergekit's default); select_topk [0, 1], start 1; nearswap's
  log10 t [-6, -1], start -4 (t = 1e-4; t bounds absolute weight differences); ram's log10
  epsilon [-7, -2], start -5 (mergekit's 1e-5); ramplus_tl's r [0, 1], start 0.1 and alpha
  [0, 1], start 0.2 (mergekit's defaults; unique changes scaled by up to 1 + r * alpha).
- Runs stored before the box was configurable used [0, 1] ([-1, 1] with negative weights) and
  are resumed with that box (the run manifest records the box).
- The step size scales with the box: ``CMA_stds`` is the box's width over the legacy width
  (1 for [0, 1], 2 for [-1, 1]; 1 for the genes added later), so ``sigma0`` (1/6) stays a
  sixth of a legacy box (of the whole box for the later genes).
- slerp t-score: [0, 4]. As in mergekit-evolve, per layer group the two models with the highest
  score are merged (ties broken by model order), the best one is the slice's base, and
  ``t = softmax(top two)[1] = 1 / (1 + exp(s1 - s2))``; so t is in [0.0180, 0.5] (the other
  half is reached by swapping which model is the base).
- della's (and della_linear's) ``epsilon`` is not a gene: it is derived per value as
  ``min(0.15, density / 2, (1 - density) / 2)`` so that ``density +/- epsilon`` stays in (0, 1)
  (mergekit's della rejects other values; 0.15 is its default).

``smooth: true`` writes each parameter as a gradient (list of G values, interpolated across the
layers) in a ``models:`` section instead of one slice per group.

Initial point (mergekit-evolve's): weight = 1/M, density = 1 (t-scores = 1/M, i.e. equal), the
other genes at their start above, or uniform in the bounds with ``random_init``
(mergekit-evolve drew U[0, 1)).
The search scores it first, then (by default) a space-filling design of whole-model merges
(:meth:`Genome.design_point`, :mod:`evolve.search.design`) before CMA-ES starts from the best.

Recipe parameters besides the genes: ``normalize`` (explicit value, else True for linear, ties,
dare_ties, della) for linear and the task-vector methods, ``int8_mask: true`` for the
task-vector methods, multislerp's ``normalize_weights`` only when ``normalize`` is set,
``dtype: bfloat16``,
``tokenizer_source`` when set. Deviations from mergekit-evolve: a ``base_model`` is not added
for linear (it would need a weight; mergekit-evolve's recipe did not merge) nor for slerp (a
slice takes exactly two models); slerp sources carry no ``weight`` with a ``tokenizer_source``
and smooth ``models:`` entries no ``layer_range`` (mergekit 0.1.5 ignores both; our recipe
model rejects them as unknown).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np

from evolve.config import GenomeConfig, canonical_json
from evolve.genes import SEARCHABLE, TASK_VECTOR_METHODS
from merge_core.errors import RecipeError

WEIGHT_BOUND = 1.0  # the legacy weight box: [0, 1], or [-1, 1] with negative weights
TASK_VECTOR_WEIGHT_MAX = 2.0  # the default high of a task-vector method's weight box
SLERP_SCORE_MAX = 4.0
DELLA_EPSILON = 0.15
DERIVED_EPSILON = frozenset({"della", "della_linear"})  # epsilon derived from density, not a gene
NORMALIZE_BY_DEFAULT = frozenset({"linear", "ties", "dare_ties", "della"})
HASH_DECIMALS = 9


class GenomeError(ValueError):
    """A vector or recipe that does not fit this genome (a programming error, not user input)."""


class Genome:
    """Maps flat float vectors to mergekit recipe dicts and back for one genome config."""

    # CMA-ES starts with a space-filling design by default (evolve.search.design).
    design_by_default = True

    def __init__(self, definition: GenomeConfig, num_layers: int, dtype: str = "bfloat16",
                 box: Mapping[str, Sequence[float]] | None = None) -> None:
        """``box``: the stored run's box (its manifest's ``genome_box``), used for every gene the
        config leaves at its default; None: the method's defaults (see the module docstring)."""
        if num_layers < 1:
            raise RecipeError("genome", f"the base model has {num_layers} layers; need at least 1")
        self.definition = definition
        self.num_layers = num_layers
        self.dtype = dtype
        self.method = definition.merge_method
        self.search = SEARCHABLE[self.method]
        self.specs = self.search.genes
        self.genes = tuple(g.name for g in self.specs)
        step = definition.layer_granularity or num_layers
        self.layer_ranges: list[tuple[int, int]] = [
            (start, min(start + step, num_layers)) for start in range(0, num_layers, step)
        ]
        self.filters: list[str | None] = list(definition.filters or []) + [None]
        per_model = len(definition.models) if self.search.per_model else 1
        self.shape = (len(self.layer_ranges), per_model, len(self.filters), len(self.genes))
        self.box = self._resolve_box(box)

    @classmethod
    def for_run(cls, definition: GenomeConfig, num_layers: int, manifest: Mapping[str, Any] | None) -> "Genome":
        """The genome of a run: a stored run (``manifest``, its ``run.json``) keeps its box (a
        manifest without one is from before the box was configurable: the legacy box)."""
        genome = cls(definition, num_layers)
        if manifest is None:
            return genome
        box = manifest.get("genome_box")
        return cls(definition, num_layers, box=genome.legacy_box() if box is None else box)

    # -- the search box -----------------------------------------------------------------

    def default_box(self) -> dict[str, tuple[float, float]]:
        """The method's default box per gene (none for slerp's t-scores)."""
        if self.method == "slerp":
            return {}
        out = {g.name: (g.low, g.high) for g in self.specs}
        if "weight" in out:
            high = TASK_VECTOR_WEIGHT_MAX if self.method in TASK_VECTOR_METHODS else WEIGHT_BOUND
            out["weight"] = (-high if self.definition.allow_negative_weights else 0.0, high)
        return out

    def legacy_box(self) -> dict[str, list[float]]:
        """The box of runs stored before it was configurable (JSON form, as in a manifest)."""
        if self.method == "slerp":
            return {}
        out = {gene: [lo, hi] for gene, (lo, hi) in self.default_box().items()}
        if "weight" in out:
            out["weight"] = [-WEIGHT_BOUND if self.definition.allow_negative_weights else 0.0, WEIGHT_BOUND]
        return out

    def _resolve_box(self, stored: Mapping[str, Sequence[float]] | None) -> dict[str, tuple[float, float]]:
        box = self.default_box()
        for gene in box:
            given = getattr(self.definition, f"{gene}_range", None)
            if given is not None:
                box[gene] = (float(given[0]), float(given[1]))
            elif stored is not None and gene in stored:
                box[gene] = (float(stored[gene][0]), float(stored[gene][1]))
        return box

    def box_json(self) -> dict[str, list[float]]:
        """The box as JSON data (recorded in the run manifest)."""
        return {gene: [lo, hi] for gene, (lo, hi) in self.box.items()}

    # -- geometry -----------------------------------------------------------------------

    @property
    def dimension(self) -> int:
        """Number of genes: groups x models x filter sets x genes per method."""
        return math.prod(self.shape)

    def gene_names(self) -> list[str]:
        """One readable name per gene, in vector order (logs' and tables' column names):
        ``g<group>/<model>/<gene>``, e.g. ``g0/spatial/weight``; with ``filters``
        ``g<group>/<model>/<filter>/<gene>``, ``*`` for the catch-all.  ``<model>`` is the last
        part of the model reference (``m<i>_`` in front where two models would share one)."""
        labels = self.columns if self.search.per_model else [None]  # None: global genes
        filters = [] if len(self.filters) == 1 else [f if f is not None else "*" for f in self.filters]
        names = []
        for g in range(self.shape[0]):
            for label in labels:
                for f in filters or [None]:
                    names.extend("/".join(p for p in (f"g{g}", label, f, gene) if p is not None)
                                 for gene in self.genes)
        return names

    @property
    def columns(self) -> list[str]:
        """A label per model column of the genome: the last part of each model reference (``m<i>_``
        in front where two would be equal), or ``all models`` for a method with global genes."""
        if not self.search.per_model:
            return ["all models"]
        labels = [ref.rstrip("/").rsplit("/", 1)[-1] or ref for ref in self.definition.models]
        return [f"m{i}_{label}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]

    def _gene_bounds(self, gene: str) -> tuple[float, float]:
        return self.box.get(gene, (0.0, SLERP_SCORE_MAX))

    @property
    def bounds(self) -> tuple[list[float], list[float]]:
        """Per-gene (lower, upper) lists, for CMA-ES's ``bounds`` option."""
        lo, hi = zip(*(self._gene_bounds(self.genes[i % len(self.genes)]) for i in range(self.dimension)))
        return list(lo), list(hi)

    @property
    def scales(self) -> list[float]:
        """Per-gene scale of the search step (``CMA_stds``): the box's width over the legacy
        box's (t-scores span 4x a legacy weight's range)."""
        if self.method == "slerp":
            return [SLERP_SCORE_MAX] * self.dimension
        legacy = {"weight": 2.0 if self.definition.allow_negative_weights else 1.0}
        per_gene = [(self.box[g][1] - self.box[g][0]) / legacy.get(g, 1.0) for g in self.genes]
        return [per_gene[i % len(self.genes)] for i in range(self.dimension)]

    @property
    def design_dimension(self) -> int:
        """The dimensions of :meth:`design_point`'s unit cube: models x filter sets x genes."""
        return math.prod(self.shape[1:])

    def design_point(self, u: Sequence[float]) -> np.ndarray:
        """The genome vector of a point ``u`` of the unit cube (the space-filling start of
        :mod:`evolve.search.design`): each model's, filter set's and gene's value shared by every
        layer group (a whole-model merge, where practice starts), placed in the box."""
        tied = np.broadcast_to(np.asarray(u, dtype=np.float64).reshape(self.shape[1:]), self.shape)
        lo, hi = (np.asarray(b, dtype=np.float64) for b in self.bounds)
        return lo + tied.reshape(-1) * (hi - lo)

    def initial_point(self, random_init: bool, rng: np.random.Generator) -> list[float]:
        """mergekit-evolve's start: weight 1/M, density 1, the other genes at their start (see the
        module docstring), each brought into the user's box (a ``density_range`` of [0.2, 0.9]
        starts at 0.9); or uniform within the bounds."""
        lo, hi = (np.asarray(b) for b in self.bounds)
        if random_init:
            return [float(v) for v in rng.uniform(lo, hi)]
        x = np.zeros(self.shape)
        for p, gene in enumerate(self.specs):
            x[..., p] = 1.0 / self.shape[1] if gene.start is None else gene.start
        return [float(v) for v in np.clip(x.reshape(-1), lo, hi)]

    # -- decode ---------------------------------------------------------------------------

    def _as_array(self, x: Sequence[float]) -> np.ndarray:
        arr = np.asarray(x, dtype=np.float64)
        if arr.shape != (self.dimension,):
            raise GenomeError(f"genome vector has shape {arr.shape}, expected ({self.dimension},)")
        if not np.all(np.isfinite(arr)):
            raise GenomeError("genome vector has non-finite values")
        return arr.reshape(self.shape)

    def _normalize_param(self) -> bool:
        if self.definition.normalize is not None:
            return self.definition.normalize
        return self.method in NORMALIZE_BY_DEFAULT

    def decode(self, x: Sequence[float]) -> dict[str, Any]:
        """The mergekit recipe dict (YAML structure) for genome vector ``x``."""
        arr = self._as_array(x)
        recipe: dict[str, Any] = {"merge_method": self.method}
        if self.method == "slerp":
            recipe["slices"] = self._slerp_slices(arr)
        else:
            values = self._values(arr)
            base = self.definition.base_model
            if self.search.base == "required" or (self.search.base == "optional" and base is not None):
                recipe["base_model"] = base
            params = self._method_params()
            if self.definition.smooth:
                recipe["models"] = self._smooth_models(values)
                if not self.search.per_model:
                    params.update({name: self._gradient(v, 0) for name, v in values.items()})
            else:
                recipe["slices"] = self._discrete_slices(values)
            if params:
                recipe["parameters"] = params
        recipe["dtype"] = self.dtype
        if self.definition.tokenizer_source is not None:
            recipe["tokenizer_source"] = self.definition.tokenizer_source
        if self.definition.tokenizer is not None:
            recipe["tokenizer"] = dict(self.definition.tokenizer)
        return recipe

    def _values(self, arr: np.ndarray) -> dict[str, np.ndarray]:
        """Each recipe parameter's values, shaped like the genome less its gene axis: genes mapped
        into their box (``|v|`` unless negative weights are allowed; log genes exponentiated)."""
        values = {}
        for p, gene in enumerate(self.specs):
            v = arr[..., p]
            lo, hi = self.box[gene.name]
            if gene.log10:
                values[gene.name] = 10.0 ** np.clip(v, lo, hi)
                continue
            if gene.name != "weight" or not self.definition.allow_negative_weights:
                v = np.abs(v)
            values[gene.name] = np.clip(v, lo, hi)
        if self.method in DERIVED_EPSILON:
            d = values["density"]
            values["epsilon"] = np.minimum(DELLA_EPSILON, np.minimum(d, 1.0 - d) / 2.0)
        return values

    def _method_params(self) -> dict[str, Any]:
        """The recipe parameters that are not genes (see the module docstring)."""
        params: dict[str, Any] = {}
        if self.method == "linear" or self.method in TASK_VECTOR_METHODS:
            params["normalize"] = self._normalize_param()
        if self.method in TASK_VECTOR_METHODS:
            params["int8_mask"] = True
        if self.method == "multislerp" and self.definition.normalize is not None:
            params["normalize_weights"] = self.definition.normalize
        return params

    def _param_value(self, per_filter: list[Any]) -> Any:
        """One parameter: a plain value, or conditional on the tensor-name filters."""
        if len(per_filter) == 1:
            return per_filter[0]
        out = [{"filter": f, "value": v} for f, v in zip(self.filters[:-1], per_filter[:-1])]
        return out + [{"value": per_filter[-1]}]

    def _at(self, values: dict[str, np.ndarray], g: int, m: int) -> dict[str, Any]:
        """The parameters of layer group ``g``, model column ``m``."""
        return {name: self._param_value([float(v[g, m, f]) for f in range(len(self.filters))])
                for name, v in values.items()}

    def _gradient(self, v: np.ndarray, m: int) -> Any:
        """Model column ``m`` of one parameter as a gradient over the layer groups (smooth)."""
        per_filter = []
        for f in range(len(self.filters)):
            gradient = [float(val) for val in v[:, m, f]]
            per_filter.append(gradient[0] if len(gradient) == 1 else gradient)
        return self._param_value(per_filter)

    def _base_source(self, layer_range: list[int] | None) -> dict[str, Any] | None:
        base = self.definition.base_model
        if self.search.base == "none" or base is None or base in self.definition.models:
            return None
        return {"model": base} if layer_range is None else {"model": base, "layer_range": layer_range}

    def _discrete_slices(self, values: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        slices = []
        for g, (start, end) in enumerate(self.layer_ranges):
            sources = []
            for m, model in enumerate(self.definition.models):
                source: dict[str, Any] = {"model": model, "layer_range": [start, end]}
                if self.search.per_model:
                    source["parameters"] = self._at(values, g, m)
                sources.append(source)
            base = self._base_source([start, end])
            if base is not None:
                sources.append(base)
            sl: dict[str, Any] = {"sources": sources}
            if not self.search.per_model:
                sl["parameters"] = self._at(values, g, 0)
            slices.append(sl)
        return slices

    def _smooth_models(self, values: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        models = []
        for m, model in enumerate(self.definition.models):
            # No layer_range here: mergekit's models entries have none (mergekit-evolve wrote one,
            # which mergekit ignored); the gradient spans all layers.
            entry: dict[str, Any] = {"model": model}
            if self.search.per_model:
                entry["parameters"] = {name: self._gradient(v, m) for name, v in values.items()}
            models.append(entry)
        base = self._base_source(None)
        if base is not None:
            models.append(base)
        return models

    def _slerp_slices(self, arr: np.ndarray) -> list[dict[str, Any]]:
        slices = []
        models = self.definition.models
        for g, (start, end) in enumerate(self.layer_ranges):
            scores = arr[g, :, 0, 0]
            # Stable: equal scores keep model order, so the result never depends on sort details.
            first, second = sorted(range(len(models)), key=lambda i: (-scores[i], i))[:2]
            t = 1.0 / (1.0 + math.exp(scores[first] - scores[second]))
            sources = [
                {"model": models[first], "layer_range": [start, end]},
                {"model": models[second], "layer_range": [start, end]},
            ]
            slices.append({"sources": sources, "base_model": models[first], "parameters": {"t": t}})
        return slices

    # -- encode ---------------------------------------------------------------------------

    def encode(self, recipe: dict[str, Any]) -> list[float]:
        """The genome vector of a recipe :meth:`decode` produced (``decode(encode(r)) == r``).

        For points inside the bounds ``encode(decode(x)) == x``, except slerp, whose decode keeps
        only the top two scores per group: there encode returns a canonical vector with the same
        recipe.
        """
        if recipe.get("merge_method") != self.method:
            raise GenomeError(f"recipe merge_method {recipe.get('merge_method')!r} is not {self.method!r}")
        x = np.zeros(self.shape)
        if self.method == "slerp":
            self._encode_slerp(recipe, x)
        elif self.definition.smooth:
            for m, params in enumerate(self._holders(recipe.get("models"), recipe, 0)):
                for p, gene in enumerate(self.specs):
                    for f, value in enumerate(self._unconditional(params[gene.name])):
                        grad = value if isinstance(value, list) else [value]
                        if len(grad) != self.shape[0]:
                            raise GenomeError(f"gradient of {len(grad)} values, expected {self.shape[0]}")
                        x[:, m, f, p] = np.log10(grad) if gene.log10 else grad
        else:
            slices = recipe.get("slices") or []
            if len(slices) != self.shape[0]:
                raise GenomeError(f"recipe has {len(slices)} slices, expected {self.shape[0]}")
            for g, sl in enumerate(slices):
                for m, params in enumerate(self._holders(sl["sources"], sl, g)):
                    for p, gene in enumerate(self.specs):
                        value = self._unconditional(params[gene.name])
                        x[g, m, :, p] = np.log10(value) if gene.log10 else value
        return [float(v) for v in x.reshape(-1)]

    def _holders(self, sources: Any, owner: dict[str, Any], g: int) -> list[dict[str, Any]]:
        """The parameter dicts holding the genes: each model's, or (global genes) ``owner``'s."""
        models = self._genes_sources(sources, g)
        return [s["parameters"] for s in models] if self.search.per_model else [owner["parameters"]]

    def _genes_sources(self, sources: Any, g: int) -> list[dict[str, Any]]:
        """The gene-carrying sources, checked against the genome's models."""
        models = self.definition.models
        if not isinstance(sources, list) or [s.get("model") for s in sources[: len(models)]] != list(models):
            raise GenomeError(f"recipe sources of group {g} do not list the genome's models in order")
        return sources[: len(models)]

    def _unconditional(self, value: Any) -> list[Any]:
        """Per-filter values of a parameter, in genome filter order (catch-all last)."""
        if len(self.filters) == 1:
            return [value]
        if not isinstance(value, list) or len(value) != len(self.filters):
            raise GenomeError(f"expected {len(self.filters)} filtered values, got {value!r:.80}")
        if [c.get("filter") for c in value] != self.filters:
            raise GenomeError("filtered values are not in the genome's filter order")
        return [c["value"] for c in value]

    def _encode_slerp(self, recipe: dict[str, Any], x: np.ndarray) -> None:
        slices = recipe.get("slices") or []
        if len(slices) != self.shape[0]:
            raise GenomeError(f"recipe has {len(slices)} slices, expected {self.shape[0]}")
        index = {name: i for i, name in enumerate(self.definition.models)}
        for g, sl in enumerate(slices):
            first, second = (index[s["model"]] for s in sl["sources"][:2])
            t = float(sl["parameters"]["t"])
            if not 0.0 < t <= 0.5:
                raise GenomeError(f"slerp t={t} of group {g} is outside (0, 0.5]")
            gap = math.log((1.0 - t) / t)  # s1 - s2, >= 0
            # Top model at the upper bound, runner-up `gap` below, the others at the floor.
            x[g, :, 0, 0] = 0.0
            x[g, first, 0, 0] = SLERP_SCORE_MAX
            x[g, second, 0, 0] = max(SLERP_SCORE_MAX - gap, 0.0)


def _round_floats(value: Any) -> Any:
    if isinstance(value, float):
        rounded = round(value, HASH_DECIMALS)
        return 0.0 if rounded == 0 else rounded  # -0.0 and 0.0 hash alike
    if isinstance(value, dict):
        return {str(k): _round_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round_floats(v) for v in value]
    return value


def recipe_hash(recipe: dict[str, Any]) -> str:
    """sha256 of the recipe's canonical JSON, floats rounded to 1e-9: equal merges hash equal."""
    return hashlib.sha256(canonical_json(_round_floats(recipe)).encode()).hexdigest()
