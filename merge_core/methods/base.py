"""The interface every merge method implements, and the types passed to it.

A merge method turns the tensors that several models hold under one name into one output
tensor.  It never sees files or recipes: the planner (streaming merges) and the in-memory
merger (the evolve hot path) resolve the recipe's parameters for each tensor and call
:meth:`MergeMethod.merge` with plain values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch

ParamValue = float | int | bool

BaseRule = Literal["required", "optional", "ignored"]
"""How a method treats ``base_model``: must be given, may be given, or is not used."""


class MethodError(ValueError):
    """A method was configured wrongly (bad parameter value, wrong number of models...).

    The message is one line and says what is wrong; callers prefix it with the YAML path.
    """


@dataclass(frozen=True)
class ParamSpec:
    """A parameter a method reads.  ``required`` ones have no default."""

    name: str
    default: ParamValue | None = None
    required: bool = False
    kind: Literal["float", "bool", "int"] = "float"
    minimum: float | None = None
    maximum: float | None = None

    def check(self, value: ParamValue) -> ParamValue:
        """Return ``value`` coerced to this spec's kind, or raise MethodError."""
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise MethodError(f"{self.name}: expected true/false, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MethodError(f"{self.name}: expected a number, got {value!r}")
        number = int(value) if self.kind == "int" else float(value)
        if self.minimum is not None and number < self.minimum:
            raise MethodError(f"{self.name}: {number} is below the minimum {self.minimum}")
        if self.maximum is not None and number > self.maximum:
            raise MethodError(f"{self.name}: {number} is above the maximum {self.maximum}")
        return number


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
    # (``fused.FUSE_MIN_ELEMENTS``): its small tensors are then fused too, since the kernels get
    # compiled anyway and one fused call costs far less than the eager path's many small ops.
    fuse_small: bool = False

    @property
    def base(self) -> torch.Tensor:
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


@runtime_checkable
class MergeMethod(Protocol):
    """What the registry holds for each ``merge_method`` name."""

    name: ClassVar[str]
    base_rule: ClassVar[BaseRule]
    global_params: ClassVar[tuple[ParamSpec, ...]]
    model_params: ClassVar[tuple[ParamSpec, ...]]
    randomized: ClassVar[bool]  # True when the result depends on ``generator``

    def check_models(self, n_models: int, base_index: int | None) -> None:
        """Raise MethodError if this method cannot merge this many models / this base."""
        ...

    def merge(
        self,
        inputs: TensorInputs,
        params: TensorParams,
        *,
        out: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Merge one tensor.

        With ``out`` (same shape, any float dtype, e.g. a model's own parameter) the result is
        written into it and ``out`` is returned; this is the in-memory hot path and must not
        allocate full-size temporaries it can avoid.  Without ``out`` a new tensor is returned.
        ``generator`` seeds the randomized methods (DARE, DELLA); it is None for others.
        """
        ...


# --- Shared bookkeeping for the built-in methods (additions; the Protocol above is the API) ---


class MethodBase:
    """Bookkeeping shared by the built-in methods: model-count checks and parameter resolution.

    Subclasses set the Protocol's class attributes plus mergekit's input contract:
    ``min_inputs``/``max_inputs`` count every tensor, ``min_non_base``/``max_non_base`` the
    tensors other than the base.  For ``base_rule == "ignored"`` every tensor is a merged model
    and ``base_index`` is disregarded.
    """

    name: ClassVar[str]
    base_rule: ClassVar[BaseRule] = "ignored"
    global_params: ClassVar[tuple[ParamSpec, ...]] = ()
    model_params: ClassVar[tuple[ParamSpec, ...]] = ()
    randomized: ClassVar[bool] = False
    min_inputs: ClassVar[int] = 1
    max_inputs: ClassVar[int | None] = None
    min_non_base: ClassVar[int | None] = None
    max_non_base: ClassVar[int | None] = None

    def check_models(self, n_models: int, base_index: int | None) -> None:
        """Raise MethodError if this method cannot merge ``n_models`` tensors with this base."""
        if self.base_rule == "ignored":
            base_index = None
        if base_index is not None and not 0 <= base_index < n_models:
            raise MethodError(f"base index {base_index} is not one of the {n_models} models")
        if self.base_rule == "required" and base_index is None:
            raise MethodError("base_model is required and must be one of the merged models")
        _check_count("models", n_models, self.min_inputs, self.max_inputs)
        if self.min_non_base is not None or self.max_non_base is not None:
            non_base = n_models - (base_index is not None)
            _check_count("models besides the base", non_base, self.min_non_base or 0, self.max_non_base)

    def resolve(
        self, inputs: TensorInputs, params: TensorParams
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Checked, defaulted parameters: ``(global values, per-model values)``.

        Per-model values are filled for the models that take them (all models when the base
        is ignored, else every model but the base; the base's dict stays empty).  Raises
        MethodError (prefixed with the method's name) naming the parameter and the model's
        index when one is missing or bad, or when the models do not fit ``check_models``.
        """
        n = len(inputs.tensors)
        where = f"{self.name}: "
        try:
            self.check_models(n, inputs.base_index)
        except MethodError as err:
            raise MethodError(f"{where}{err}") from None
        if len(params.per_model) != n:
            raise MethodError(f"{where}got parameters for {len(params.per_model)} models but {n} tensors")
        glob = {s.name: _resolve_one(s, params.global_.get(s.name), where) for s in self.global_params}
        skip = None if self.base_rule == "ignored" else inputs.base_index
        per_model: list[dict[str, Any]] = []
        for i, given in enumerate(params.per_model):
            if i == skip:
                per_model.append({})
                continue
            per_model.append(
                {s.name: _resolve_one(s, given.get(s.name), f"{where}model {i}: ") for s in self.model_params}
            )
        return glob, per_model


def _check_count(what: str, count: int, minimum: int, maximum: int | None) -> None:
    def noun(number: int) -> str:
        return what.replace("models", "model", 1) if number == 1 else what

    if maximum is not None and minimum == maximum and count != minimum:
        raise MethodError(f"needs exactly {minimum} {noun(minimum)}, got {count}")
    if count < minimum:
        raise MethodError(f"needs at least {minimum} {noun(minimum)}, got {count}")
    if maximum is not None and count > maximum:
        raise MethodError(f"accepts at most {maximum} {noun(maximum)}, got {count}")


def _resolve_one(spec: ParamSpec, value: ParamValue | None, where: str) -> Any:
    if value is None:
        if spec.required:
            raise MethodError(f"{where}missing required parameter '{spec.name}'")
        return spec.default
    try:
        return spec.check(value)
    except MethodError as err:
        raise MethodError(f"{where}{err}") from None
