"""Layer-stacking candidates in memory, without copying weights.

A worker of a stacking run loads every source once (a model folder's tensors, or a recipe
source merged once in memory), rounded to the recipe's dtype as ``merge-yaml`` would write them
and held in the evaluation dtype on the evaluation device.  Its evaluated model (built from the
first source's folder) gets a pool of decoder-layer modules; a candidate's passthrough recipe is
applied by pointing each module's parameters at the chosen source layer's tensors
(``param.data = tensor``: no copy), putting the first ``d`` modules in the model's layer list
and setting the depth, so a candidate costs no merge time.  As mergekit's passthrough, the
embeddings come from the first slice's source and the final norm and ``lm_head`` from the last's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["StackingSource", "StackingSpec", "StackedModel", "layer_plan"]

LAYERS = "model.layers."


@dataclass(frozen=True)
class StackingSource:
    """One source as the recipes name it (``ref``): a model folder, or a recipe merged in memory."""

    ref: str
    path: Path | None = None  # a model folder
    recipe: dict[str, Any] | None = None  # a recipe source (merged once per worker)


@dataclass(frozen=True)
class StackingSpec:
    """A stacking run's sources and the most layers a candidate has (WorkerSpec.stacking)."""

    sources: tuple[StackingSource, ...]
    max_layers: int


def layer_plan(recipe: dict[str, Any], sources: Sequence[str]) -> list[tuple[int, int]]:
    """(source index, layer index) per output layer of a passthrough recipe over ``sources``."""
    if recipe.get("merge_method") != "passthrough" or not recipe.get("slices"):
        raise ValueError("a stacking candidate is a passthrough recipe with slices")
    index = {ref: i for i, ref in enumerate(sources)}
    out = []
    for number, sl in enumerate(recipe["slices"]):
        (src,) = sl["sources"]
        if src["model"] not in index:
            raise ValueError(f"slices[{number}]: {src['model']!r} is not a stacking source")
        start, end = src["layer_range"]
        out.extend((index[src["model"]], layer) for layer in range(start, end))
    return out


def _load(source: StackingSource, relative_to: Path | None, seed: int) -> dict[str, torch.Tensor]:
    if source.path is not None:
        from merge_core.tensor_io import CheckpointReader

        reader = CheckpointReader(source.path)
        try:
            return {name: reader.read(name) for name in reader.names()}
        finally:
            reader.close()
    from merge_core.in_memory import InMemoryMerger
    from merge_core.planner import Planner
    from merge_core.recipe import recipe_from_dict

    plan = Planner(relative_to=relative_to).plan(recipe_from_dict(source.recipe or {}), seed=seed)
    merger = InMemoryMerger(plan)
    return merger.merged_state_dict(plan)


class StackedModel:
    """The evaluated model, re-pointed per candidate (see the module docstring).

    ``model``: a transformers causal LM of the sources' architecture; ``sources``: their refs
    and how to load them; ``dtype``: the recipe's dtype every tensor is rounded to.
    """

    def __init__(self, model: torch.nn.Module, spec: StackingSpec, *, dtype: torch.dtype | None,
                 relative_to: Path | None = None, seed: int = 0) -> None:
        self.model = model
        self.refs = [s.ref for s in spec.sources]
        ref_param = next(model.parameters())
        self.tensors: list[dict[str, torch.Tensor]] = []
        for source in spec.sources:
            loaded = _load(source, relative_to, seed)
            rounded = {name: (t.to(dtype) if dtype is not None and t.is_floating_point() else t) for name, t in
                       loaded.items()}
            self.tensors.append({name: t.to(device=ref_param.device, dtype=ref_param.dtype).contiguous()
                                 for name, t in rounded.items()})
        decoder = model.model
        layers = list(decoder.layers)
        while len(layers) < spec.max_layers:  # more slots than the sources have layers
            layers.append(copy.deepcopy(layers[-1]))
        self.pool = layers
        # Per-layer attention kinds (Qwen2/3, Gemma...: the decoder looks each layer's up by
        # position): a stacked layer keeps the kind of the source layer it runs.
        self.layer_types = list(getattr(model.config, "layer_types", None) or [])
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))
        self.bytes = sum(t.numel() * t.element_size() for d in self.tensors for t in d.values())

    def apply(self, plan: Sequence[tuple[int, int]]) -> None:
        """Make the model the stack ``plan`` describes ((source, layer) per output layer)."""
        if not plan or len(plan) > len(self.pool):
            raise ValueError(f"a stack of {len(plan)} layers (this run allows 1 to {len(self.pool)})")
        model, decoder = self.model, self.model.model
        for k, (source, layer) in enumerate(plan):
            module = self.pool[k]
            tensors = self.tensors[source]
            for name, param in module.named_parameters():
                param.data = tensors[f"{LAYERS}{layer}.{name}"]
            attention = getattr(module, "self_attn", None)
            if attention is not None and hasattr(attention, "layer_idx"):
                attention.layer_idx = k  # the KV cache is indexed by position in the stack
        decoder.layers = torch.nn.ModuleList(self.pool[: len(plan)])
        model.config.num_hidden_layers = len(plan)
        if self.layer_types:
            model.config.layer_types = [self.layer_types[layer] for _, layer in plan]
            for module, kind in zip(decoder.layers, model.config.layer_types):
                for part in (module, getattr(module, "self_attn", None)):
                    for attr in ("layer_type", "attention_type"):
                        if part is not None and hasattr(part, attr):
                            setattr(part, attr, kind)
        first, last = self.tensors[plan[0][0]], self.tensors[plan[-1][0]]
        decoder.embed_tokens.weight.data = first["model.embed_tokens.weight"]
        decoder.norm.weight.data = last["model.norm.weight"]
        if not self.tied and "lm_head.weight" in last:
            model.lm_head.weight.data = last["lm_head.weight"]

    def memory_report(self) -> str:
        """Where the sources live and what they take."""
        return f"stacking: {len(self.tensors)} sources resident, {self.bytes / 2**20:.1f} MiB"
