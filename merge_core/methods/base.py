"""The interface every merge method implements, and the types passed to it.

A merge method turns the tensors that several models hold under one name into one output
tensor.  It never sees files or recipes: the planner (streaming merges) and the in-memory
merger (the evolve hot path) resolve the recipe's parameters for each tensor and call
:meth:`MergeMethod.merge` with plain values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch

from merge_core.errors import MethodError
from merge_core.kernels.inputs import ParamValue, TensorInputs, TensorParams

# MethodError, ParamValue, TensorInputs and TensorParams are defined below this package (in
# merge_core.errors and merge_core.kernels.inputs) so that the kernels can use them without
# importing the methods; they stay importable from here, where the interface is described.
__all__ = [
    "BaseRule", "MergeMethod", "MethodBase", "MethodError", "ParamSpec", "ParamValue", "TensorInputs",
    "TensorParams", "Values",
]

Values = dict[str, Any]
"""Resolved parameter values by name (one model's, or the global ones)."""

BaseRule = Literal["required", "optional", "ignored"]
"""How a method treats ``base_model``: must be given, may be given, or is not used."""


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
        if self.kind == "int" and not float(value).is_integer():
            raise MethodError(f"{self.name}: expected a whole number, got {value!r}")
        number = int(value) if self.kind == "int" else float(value)
        if self.minimum is not None and number < self.minimum:
            raise MethodError(f"{self.name}: {number} is below the minimum {self.minimum}")
        if self.maximum is not None and number > self.maximum:
            raise MethodError(f"{self.name}: {number} is above the maximum {self.maximum}")
        return number


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
    """The skeleton of the built-in methods: model-count checks, parameter resolution, merge.

    Subclasses set the Protocol's class attributes plus mergekit's input contract:
    ``min_inputs``/``max_inputs`` count every tensor, ``min_non_base``/``max_non_base`` the
    tensors other than the base.  For ``base_rule == "ignored"`` every tensor is a merged model
    and ``base_index`` is disregarded.  They implement :meth:`_merge`, which :meth:`merge`
    calls with the parameters already resolved.
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
    # Clear ``inputs.cache`` after a one-shot call (``TensorInputs.reuse`` False): for methods
    # whose cache holds per-call data (random fields, ranks) that no later call reads.
    clear_one_shot_cache: ClassVar[bool] = False

    def merge(self, inputs: TensorInputs, params: TensorParams, *, out: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """Merge one tensor (see :class:`MergeMethod`): :meth:`resolve` the parameters, then
        :meth:`_merge`."""
        try:
            glob, per_model = self.resolve(inputs, params)
            return self._merge(inputs, glob, per_model, out, generator)
        finally:
            if self.clear_one_shot_cache and not inputs.reuse:
                inputs.cache.clear()

    def _merge(self, inputs: TensorInputs, glob: Values, per_model: list[Values],
               out: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        """The method's own math, given :meth:`resolve`'s values (``out`` and ``generator`` as
        in :meth:`MergeMethod.merge`)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _merge")

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

    def resolve(self, inputs: TensorInputs, params: TensorParams) -> tuple[Values, list[Values]]:
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
        per_model: list[Values] = []
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
