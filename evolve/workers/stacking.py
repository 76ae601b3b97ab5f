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

_NOT_PER_LAYER = ("architectures", "eos_token_id", "bos_token_id", "pad_token_id")


def _layer_list(model: torch.nn.Module, arch: Any) -> tuple[torch.nn.Module, str, list[torch.nn.Module], str]:
    """(parent module, attribute, layers, their path) of the model's decoder-layer list: the module list the
    checkpoint's layer prefix names, else the one whose first layer holds layer 0's tensors."""
    named = dict(model.named_modules())
    path = arch.layer_prefix.rstrip(".")
    found = named.get(path)
    if not isinstance(found, torch.nn.ModuleList):
        wanted = set(arch.layers[0])
        found, path = None, ""
        for name, module in named.items():
            if (isinstance(module, torch.nn.ModuleList) and len(module) == arch.num_layers()
                    and {n for n, _ in module[0].named_parameters()} == wanted):
                found, path = module, name
                break
        if found is None:
            raise ValueError(f"layer stacking: no decoder-layer list of the model holds {arch.layer_prefix}N")
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr, list(found), path


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
    and how to load them; ``dtype``: the recipe's dtype every tensor is rounded to.  The decoder's
    layer list, the tensors before and after it and each layer's tensors come from the sources'
    layout (:func:`merge_core.architecture.architecture_for`), whatever the family names them.
    """

    def __init__(self, model: torch.nn.Module, spec: StackingSpec, *, dtype: torch.dtype | None,
                 relative_to: Path | None = None, seed: int = 0) -> None:
        from merge_core.architecture import architecture_for

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
        config = model.config.to_dict()
        self.arch = architecture_for(config, self.refs[0], self.tensors[0])
        self.parent, self.attr, layers, path = _layer_list(model, self.arch)
        # Each original layer is the template of its kind: its per-layer config entries (attention
        # kind, rope use...) and its tensors (a dense layer among MoE ones).  A slot running a
        # layer of another kind gets a copy of that kind's template (its attributes are set at
        # construction from the config, so re-pointing tensors alone would keep the wrong kind).
        self.per_layer = {key: list(value) for key, value in vars(model.config).items()
                          if isinstance(value, list) and len(value) == len(layers) and key not in _NOT_PER_LAYER}
        self.kinds = [self._kind(i) for i in range(len(layers))]
        self.templates = {}
        for i, kind in enumerate(self.kinds):
            self.templates.setdefault(kind, layers[i])
        self.pool: list[tuple[Any, torch.nn.Module]] = [(self.kinds[i], layer) for i, layer in enumerate(layers)]
        while len(self.pool) < spec.max_layers:  # more slots than the sources have layers
            self.pool.append((self.kinds[-1], copy.deepcopy(layers[-1])))
        params = dict(model.named_parameters())  # tied parameters once, under their first name
        self.outside = [name for name in params if not name.startswith(f"{path}.")]
        missing = [name for name in self.outside if name not in self.tensors[0]]
        if missing:
            raise ValueError(f"layer stacking: the model's parameter {missing[0]} is not a tensor of "
                             f"'{self.refs[0]}' (this model class names its weights unlike its checkpoint)")
        self.post = {spec.name for spec in self.arch.post} | {self.arch.head or ""}
        self.bytes = sum(t.numel() * t.element_size() for d in self.tensors for t in d.values())

    def _kind(self, layer: int) -> Any:
        return (tuple(values[layer] for values in self.per_layer.values()), self.arch.layers[layer])

    def _slot(self, k: int, kind: Any) -> torch.nn.Module:
        have, module = self.pool[k]
        if have != kind:
            if kind not in self.templates:
                raise ValueError(f"no layer of the evaluated model is of the kind {kind[0]}")
            module = copy.deepcopy(self.templates[kind])
            self.pool[k] = (kind, module)
        return module

    def apply(self, plan: Sequence[tuple[int, int]]) -> None:
        """Make the model the stack ``plan`` describes ((source, layer) per output layer)."""
        if not plan or len(plan) > len(self.pool):
            raise ValueError(f"a stack of {len(plan)} layers (this run allows 1 to {len(self.pool)})")
        model, prefix = self.model, self.arch.layer_prefix
        modules = []
        for k, (source, layer) in enumerate(plan):
            module = self._slot(k, self._kind(layer))
            tensors = self.tensors[source]
            for name, param in module.named_parameters():
                param.data = tensors[f"{prefix}{layer}.{name}"]
            for part in module.modules():  # the KV cache is indexed by position in the stack
                if hasattr(part, "layer_idx"):
                    part.layer_idx = k
            modules.append(module)
        setattr(self.parent, self.attr, torch.nn.ModuleList(modules))
        config = model.config
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if hasattr(config, key) and isinstance(getattr(config, key), int):
                setattr(config, key, len(plan))
        for key, values in self.per_layer.items():
            setattr(config, key, [values[layer] for _, layer in plan])
        # As mergekit's passthrough: tensors before the layers from the first slice's source,
        # after them (final norm, head) from the last's.  A tied head follows its embedding.
        params = dict(model.named_parameters())
        first, last = self.tensors[plan[0][0]], self.tensors[plan[-1][0]]
        for name in self.outside:
            params[name].data = (last if name in self.post else first)[name]

    def memory_report(self) -> str:
        """Where the sources live and what they take."""
        return f"stacking: {len(self.tensors)} sources resident, {self.bytes / 2**20:.1f} MiB"
