"""The layer-stacking genome (the data-flow space): which layers, from which model, in which order.

The output model is a sequence of T layer slots (``stacking.slots``; default the sources'
depth L).  Each slot takes one decoder layer of one source or is skipped.  For CMA-ES (and the
other strategies) slot i has ``2 + M`` genes in [0, 1], M = the number of sources::

    x has shape (T, 2 + M), flattened in C order:  x[i * (2 + M) + k]
      k = 0      use:    the slot holds a layer when use >= 0.5
      k = 1      layer:  which layer of its source, round(layer * (L - 1))
      k = 2 + m  score of source m: the slot's source is the highest-scoring one (ties: the
                 first)

The number of used slots is kept within ``[min_layers, max_layers]``: below, the unused slots
with the highest ``use`` are added; above, the used ones with the lowest are dropped.

A decoded candidate is mergekit's ``passthrough`` recipe: one slice per run of slots that take
consecutive layers of one source (``layer_range: [start, end)``), so ``best_config.yaml`` merges
unchanged with ``merge-yaml`` and ``mergekit-yaml``.  As mergekit's passthrough does, the
embeddings come from the first slice's source and the final norm and ``lm_head`` from the last
slice's.  Sources are referenced as the recipe writes them (a recipe source, e.g. an earlier
parameter-space run's ``best_config.yaml``, by the folder its merge is written to).

Initial point: every slot used, slot i at layer ``i * (L - 1) / (T - 1)`` (the sources' own
order), equal source scores (the first population spreads over the sources), or uniform in
[0, 1] with ``random_init``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from evolve.genome import GenomeError

__all__ = ["StackingGenome"]

USE_THRESHOLD = 0.5


class StackingGenome:
    """Maps flat vectors to passthrough (layer-stacking) recipes; the interface of
    :class:`evolve.genome.Genome` that the search uses.

    ``sources``: the references the recipes name, one per source; ``source_layers``: the depth L
    of the sources (all alike); ``slots``: T; ``min_layers``/``max_layers``: the depth bounds.
    """

    method = "passthrough"
    genes = ("use", "layer")
    # No space-filling start by default: a uniform point of this box is a random stack (and on the
    # toy zoo a design made stacking runs worse: README, "The space-filling start").
    design_by_default = False

    def __init__(self, sources: Sequence[str], source_layers: int, *, slots: int | None = None,
                 min_layers: int = 1, max_layers: int | None = None, dtype: str = "bfloat16") -> None:
        if source_layers < 1 or not sources:
            raise GenomeError("stacking needs sources with at least one layer")
        self.sources = list(sources)
        self.source_layers = source_layers
        self.slots = slots or source_layers
        self.min_layers = min_layers
        self.max_layers = max_layers or self.slots
        self.dtype = dtype
        self.num_layers = source_layers  # (the run manifest's depth: the sources' layers)
        self.shape = (self.slots, 2 + len(self.sources))

    # -- geometry -------------------------------------------------------------------------

    @property
    def dimension(self) -> int:
        """Genes: slots x (use, layer, one score per source)."""
        return math.prod(self.shape)

    @property
    def bounds(self) -> tuple[list[float], list[float]]:
        """[0, 1] for every gene."""
        return [0.0] * self.dimension, [1.0] * self.dimension

    @property
    def scales(self) -> list[float]:
        """Every gene spans 1."""
        return [1.0] * self.dimension

    def box_json(self) -> dict[str, list[float]]:
        """The search box as JSON (the manifest's ``genome_box``): fixed, [0, 1] per gene."""
        return {"unit": [0.0, 1.0]}

    def legacy_box(self) -> dict[str, list[float]]:
        """No run of an earlier version stacked layers: the box is always the unit box."""
        return self.box_json()

    @property
    def design_dimension(self) -> int:
        """A space-filling start (:mod:`evolve.search.design`) covers every gene."""
        return self.dimension

    def design_point(self, u: Sequence[float]) -> np.ndarray:
        """The genome vector of a point of the unit cube: the box is the unit cube."""
        return np.array(u, dtype=np.float64)

    def initial_point(self, random_init: bool, rng: np.random.Generator) -> list[float]:
        """Every slot used, in the sources' own layer order, equal source scores; or uniform."""
        if random_init:
            return [float(v) for v in rng.uniform(0.0, 1.0, self.dimension)]
        x = np.zeros(self.shape)
        x[:, 0] = 0.75
        x[:, 1] = np.linspace(0.0, 1.0, self.slots) if self.slots > 1 else 0.0
        x[:, 2:] = 0.5
        return [float(v) for v in x.reshape(-1)]

    # -- decode -----------------------------------------------------------------------------

    def layers(self, x: Sequence[float]) -> list[tuple[int, int]]:
        """The candidate's layers in order: (source index, layer index) per used slot."""
        arr = np.asarray(x, dtype=np.float64)
        if arr.shape != (self.dimension,):
            raise GenomeError(f"genome vector has shape {arr.shape}, expected ({self.dimension},)")
        if not np.all(np.isfinite(arr)):
            raise GenomeError("genome vector has non-finite values")
        genes = np.clip(arr.reshape(self.shape), 0.0, 1.0)
        use = genes[:, 0]
        used = set(np.flatnonzero(use >= USE_THRESHOLD).tolist())
        by_use = sorted(range(self.slots), key=lambda i: (-use[i], i))  # most wanted first
        for i in by_use:
            if len(used) >= self.min_layers:
                break
            used.add(i)
        for i in reversed(by_use):
            if len(used) <= self.max_layers:
                break
            used.discard(i)
        out = []
        for i in sorted(used):
            source = int(np.argmax(genes[i, 2:]))  # first of equal scores
            layer = int(round(genes[i, 1] * (self.source_layers - 1)))
            out.append((source, layer))
        return out

    def decode(self, x: Sequence[float]) -> dict[str, Any]:
        """The passthrough recipe (YAML structure) of genome vector ``x``."""
        slices: list[dict[str, Any]] = []
        run: list[int] | None = None  # [source, start, end)
        for source, layer in self.layers(x):
            if run is not None and run[0] == source and run[2] == layer:
                run[2] += 1
                continue
            if run is not None:
                slices.append(self._slice(run))
            run = [source, layer, layer + 1]
        assert run is not None  # min_layers >= 1
        slices.append(self._slice(run))
        return {"merge_method": "passthrough", "slices": slices, "dtype": self.dtype}

    def _slice(self, run: list[int]) -> dict[str, Any]:
        return {"sources": [{"model": self.sources[run[0]], "layer_range": [run[1], run[2]]}]}

    def gene_names(self) -> list[str]:
        """One name per gene, in vector order (``slot3/use``, ``slot3/layer``, ``slot3/<source>``)."""
        names = []
        for i in range(self.slots):
            names += [f"slot{i}/use", f"slot{i}/layer"] + [f"slot{i}/{s}" for s in self.sources]
        return names
