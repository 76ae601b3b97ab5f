"""A checkpoint's tensors as the installed transformers' models hold them (fused MoE experts).

transformers 5 keeps the experts of a mixture-of-experts layer as one 3-D tensor per projection
(``mlp.experts.gate_up_proj``: every expert's gate and up projections, stacked) while hub
checkpoints, and what ``save_pretrained`` writes, keep one 2-D tensor per expert
(``mlp.experts.3.gate_proj.weight``); its conversion registry (``transformers.conversion_mapping``)
says how one becomes the other.  mergekit 0.1.5 merges MoE checkpoints in the models' layout, so
a magnitude, angle or norm of a method (TIES, SLERP, Model Stock) spans all the experts of a
projection; to give the same tensors, the engine reads such checkpoints through this view.

Only checkpoints with MoE-looking names (``experts``, ``moe``) consult the registry (importing
it costs seconds).  Renamings and the stack/concatenate conversions are applied; a checkpoint
needing any other conversion is read as it is stored (transformers converts it when loading).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

_MOE_NAME = re.compile(r"(^|\.)(experts|block_sparse_moe|moe)\b")


@dataclass(frozen=True)
class Derived:
    """One tensor of the view: the stored tensors it is built from and how.

    ``parts[i]`` lists stored tensor names (by expert number for a stack); ``op`` is ``rename``
    (one stored tensor), ``stack`` (one part, stacked along a new first axis) or ``stack_cat``
    (each part stacked, the stacks concatenated along axis 1).
    """

    parts: tuple[tuple[str, ...], ...]
    op: str

    def sources(self) -> tuple[str, ...]:
        """Every stored tensor this one reads."""
        return tuple(name for part in self.parts for name in part)

    def shape(self, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
        """The shape of the view's tensor, from the stored shapes."""
        first = tuple(shapes[self.parts[0][0]])
        if self.op == "rename":
            return first
        if self.op == "stack":
            return (len(self.parts[0]), *first)
        return (len(self.parts[0]), sum(shapes[p[0]][0] for p in self.parts), *first[1:])

    def build(self, read: Any) -> torch.Tensor:
        """The tensor, reading stored tensors with ``read(name)``."""
        if self.op == "rename":
            return read(self.parts[0][0])
        stacks = [torch.stack([read(name) for name in part]) for part in self.parts]
        return stacks[0] if self.op == "stack" else torch.cat(stacks, dim=1)


@lru_cache(maxsize=32)
def _rules(model_type: str) -> tuple[tuple[str, tuple[str, ...], tuple[str, ...], tuple[tuple[str, int], ...]], ...]:
    """The registry's transforms for ``model_type`` as plain data: (kind, sources, targets, ops)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4: models keep the stored layout
        return ()
    rules = []
    for transform in get_checkpoint_conversion_mapping(model_type) or ():
        ops = tuple((type(op).__name__, int(getattr(op, "dim", 0))) for op in getattr(transform, "operations", ()))
        kind = "rename" if type(transform).__name__ == "WeightRenaming" else "convert"
        rules.append((kind, tuple(transform.source_patterns), tuple(transform.target_patterns), ops))
    return tuple(rules)


def _op(ops: tuple[tuple[str, int], ...], parts: int) -> str | None:
    if ops == (("MergeModulelist", 0),) and parts == 1:
        return "stack"
    if ops == (("MergeModulelist", 0), ("Concatenate", 1)) and parts >= 2:
        return "stack_cat"
    return None


def model_view(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Derived]:
    """The tensors whose name or layout the installed transformers' model changes: view name ->
    :class:`Derived`.  Empty when the checkpoint is read as stored."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not any(_MOE_NAME.search(name) for name in shapes):
        return {}
    rules = _rules(model_type)
    current: dict[str, Derived] = {name: Derived(((name,),), "rename") for name in shapes}
    for kind, sources, targets, ops in rules:
        if kind == "rename":
            renamed = {}
            for name, derived in current.items():
                for source, target in zip(sources, targets):
                    name = re.sub(source, target, name)
                renamed[name] = derived
            current = renamed
            continue
        op = _op(ops, len(sources))
        if op is None or len(targets) != 1:
            return {}  # a conversion this view does not do: read the checkpoint as stored
        patterns = [re.compile(source.replace("*", r"(\d+)")) for source in sources]
        groups: dict[str, list[dict[int, str]]] = {}
        for name in list(current):
            for i, pattern in enumerate(patterns):
                match = pattern.search(name)
                if match:
                    target = name[: match.start()] + targets[0] + name[match.end():]
                    groups.setdefault(target, [{} for _ in patterns])[i][int(match.group(1))] = name
                    break
        for target, found in groups.items():
            experts = sorted(found[0])
            if any(sorted(part) != experts or current[part[e]].op != "rename" for part in found for e in part) \
                    or experts != list(range(len(experts))):
                return {}
            parts = tuple(tuple(current.pop(part[e]).parts[0][0] for e in experts) for part in found)
            current[target] = Derived(parts, op)
    return {name: d for name, d in current.items() if d.op != "rename" or d.parts[0][0] != name}


__all__ = ["Derived", "model_view"]
