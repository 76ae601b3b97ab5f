"""What a merge method is given for one tensor: the models' tensors and the resolved parameters.

These types sit below both the kernels (:mod:`merge_core.kernels`) and the method classes
(:mod:`merge_core.methods`): the kernels must not import the methods package (its ``__init__``
imports every method, and the methods import the kernels).  :mod:`merge_core.methods.base`
re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from merge_core.errors import MethodError

ParamValue = float | int | bool


@dataclass
class TensorInputs:
    """The tensors the merged models hold under one name.

    ``tensors[i]`` belongs to model ``i`` in recipe order; the base model, when the recipe has
    one, is one of them at ``base_index`` (the planner appends it when the recipe lists it only
    as ``base_model``).  Tensors may be any float dtype; methods compute in float32 (or in
    ``compute_dtype``) and the caller casts the result.

    ``cache`` lets a method keep derived data (task vectors, sorted magnitudes...) between calls.
    The in-memory merger keeps one ``TensorInputs`` alive for the whole evolve run, so whatever
    a method stores there is computed once per run instead of once per candidate.  Cached data
    must depend only on ``tensors`` and ``base_index``, never on parameters.
    """

    name: str
    tensors: list[torch.Tensor]
    base_index: int | None = None
    compute_dtype: torch.dtype = torch.float32
    cache: dict[str, Any] = field(default_factory=dict)
    # True when the same inputs will be merged again with other parameters (the in-memory
    # merger): derived data worth caching.  False for one-shot merges (merge-yaml), where
    # building a cache that is never reused (e.g. a full sort) only costs time and memory.
    reuse: bool = False
    # Set by the in-memory merger when the model also has tensors big enough for fused kernels
    # (:data:`~merge_core.kernels.fused.FUSE_MIN_ELEMENTS`): its small tensors are then fused too, since the kernels get
    # compiled anyway and one fused call costs far less than the eager path's many small ops.
    fuse_small: bool = False

    @property
    def base(self) -> torch.Tensor:
        """The base model's tensor; MethodError when the merge has no base model."""
        if self.base_index is None:
            raise MethodError(f"{self.name}: this method needs a base_model")
        return self.tensors[self.base_index]

    @property
    def others(self) -> list[int]:
        """Indices of the models that are not the base, in recipe order."""
        return [i for i in range(len(self.tensors)) if i != self.base_index]


@dataclass(frozen=True)
class TensorParams:
    """Parameter values resolved for one tensor.

    ``global_`` holds the method's ``global_params`` (one value for the tensor);
    ``per_model[i]`` holds its ``model_params`` for model ``i`` (aligned with
    ``TensorInputs.tensors``; the base's entry is present but may be empty).
    Both are already checked against the specs and defaulted.
    """

    global_: dict[str, ParamValue]
    per_model: list[dict[str, ParamValue]]
