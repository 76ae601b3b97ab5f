"""What ``merge-evolve`` can search, per merge method: its genes, their default boxes and starts.

One definition of these facts for the config validation (:mod:`evolve.config`, which must not
import numpy) and the genome (:mod:`evolve.genome`, whose docstring explains the encoding).

A gene is one recipe parameter.  *Per-model* genes (``weight``, ``density``, ``gamma``) are
written into each searched model's ``parameters``; *global* genes (``select_topk``, ``t``,
``epsilon``, ``r``, ``alpha``) into the recipe's parameters (per slice, or as a gradient).
A ``log10`` gene holds the base-10 logarithm of its parameter: nearswap's ``t`` and RAM's
``epsilon`` are thresholds on absolute weight differences, which span orders of magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gene:
    """A searched recipe parameter: its default box and start, in gene space."""

    name: str
    low: float
    high: float
    start: float | None  # None: 1/M (weights: the equal merge)
    log10: bool = False


WEIGHT = Gene("weight", 0.0, 1.0, None)  # high 2 for the task-vector methods, see weight_high
DENSITY = Gene("density", 0.0, 1.0, 1.0)
GAMMA = Gene("gamma", 0.0, 0.1, 0.01)  # breadcrumbs: the largest changes dropped (mergekit's 0.01)
SELECT_TOPK = Gene("select_topk", 0.0, 1.0, 1.0)  # sce: the most varying elements kept
NEARSWAP_T = Gene("t", -6.0, -1.0, -4.0, log10=True)  # 1e-6 .. 0.1; starts at 1e-4
RAM_EPSILON = Gene("epsilon", -7.0, -2.0, -5.0, log10=True)  # 1e-7 .. 0.01; mergekit's 1e-5
RAM_R = Gene("r", 0.0, 1.0, 0.1)
RAM_ALPHA = Gene("alpha", 0.0, 1.0, 0.2)
SLERP_SCORE = Gene("t", 0.0, 4.0, None)  # slerp's per-model t-score (see evolve.genome)


@dataclass(frozen=True)
class Searchable:
    """How one merge method is searched.

    ``base``: "required", "optional" (task vectors when ``genome.base_model`` is given) or
    "none"; ``others``: (min, max) models besides the base (max None: no limit);
    ``per_model``: genes per searched model (else global genes, one set per layer group);
    ``task_vectors``: weights of task vectors (their default box reaches 2).
    """

    genes: tuple[Gene, ...]
    base: str = "required"
    others: tuple[int, int | None] = (1, None)
    per_model: bool = True
    task_vectors: bool = False


_TV = {"base": "required", "task_vectors": True}
SEARCHABLE: dict[str, Searchable] = {
    "linear": Searchable((WEIGHT,), base="none"),
    "task_arithmetic": Searchable((WEIGHT,), **_TV),
    "ties": Searchable((WEIGHT, DENSITY), **_TV),
    "dare_ties": Searchable((WEIGHT, DENSITY), **_TV),
    "dare_linear": Searchable((WEIGHT, DENSITY), **_TV),
    "breadcrumbs": Searchable((WEIGHT, DENSITY), **_TV),
    "della": Searchable((WEIGHT, DENSITY), **_TV),
    "slerp": Searchable((SLERP_SCORE,), base="none", others=(2, None)),
    "breadcrumbs_ties": Searchable((WEIGHT, DENSITY, GAMMA), **_TV),
    "della_linear": Searchable((WEIGHT, DENSITY), **_TV),
    "multislerp": Searchable((WEIGHT,), base="optional"),
    "nuslerp": Searchable((WEIGHT,), base="optional", others=(2, 2)),
    "sce": Searchable((SELECT_TOPK,), per_model=False),
    "nearswap": Searchable((NEARSWAP_T,), others=(1, 1), per_model=False),
    "ram": Searchable((RAM_EPSILON,), per_model=False),
    "ramplus_tl": Searchable((RAM_R, RAM_ALPHA), per_model=False),
}

# Registered merge methods with nothing to search, and why (the one-line refusal says it).
NOTHING_TO_SEARCH: dict[str, str] = {
    "karcher": "mergekit 0.1.5 gives karcher no per-model parameter (every model weighs 1/N; max_iter "
               "and tol only bound its iteration)",
    "arcee_fusion": "mergekit 0.1.5 gives arcee_fusion no parameter at all (its mask comes from the tensors)",
    "model_stock": "model_stock has no continuous parameter (its ratio comes from the models' angles)",
    "passthrough": "passthrough copies one model (search layer stacks with a stacking: section instead)",
}

METHOD_GENES: dict[str, tuple[str, ...]] = {m: tuple(g.name for g in s.genes) for m, s in SEARCHABLE.items()}
"""Gene names per searchable method, in gene order."""

BASE_METHODS = frozenset(m for m, s in SEARCHABLE.items() if s.base == "required")
"""Methods that need ``genome.base_model``."""

TASK_VECTOR_METHODS = frozenset(m for m, s in SEARCHABLE.items() if s.task_vectors)
"""mergekit's generalized task arithmetic: ``normalize`` and ``int8_mask`` parameters, weights up to 2."""


__all__ = ["BASE_METHODS", "Gene", "METHOD_GENES", "NOTHING_TO_SEARCH", "SEARCHABLE", "Searchable",
           "TASK_VECTOR_METHODS"]
