"""The recipe: a mergekit 0.1.5 compatible YAML merge configuration, validated with pydantic.

Accepted top-level keys are mergekit's: ``models`` | ``slices`` | ``modules`` (exactly one),
``merge_method``, ``base_model``, ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source``,
``tokenizer`` (``source``, ``tokens``, ``pad_to_multiple_of``) and ``chat_template``.  Unlike
mergekit, unknown keys are errors (mergekit silently ignores them, so a typo such as
``paramters:`` would change the merge without a word).

Every problem becomes ONE line naming its YAML path, e.g.
``slices[0].sources[1].layer_range: end must be greater than start, got [5, 3]`` or
``merge_method: unknown merge_method 'foo'; known: linear, slerp, ...``.  Checks that need the
models themselves (layer counts, shapes) happen in the planner.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from merge_core.dtypes import RECIPE_DTYPES
from merge_core.errors import MethodError, RecipeError
from merge_core.params import SettingError, check_setting, coerce_value, iter_values
from merge_core.yaml_io import load_yaml_file, load_yaml_text, short_repr


def _fail(subpath: str, message: str) -> PydanticCustomError:
    """A validation error whose location is the current field plus ``subpath``."""
    return PydanticCustomError("recipe_error", "{message}", {"message": message, "subpath": subpath})


def _short(value: Any) -> str:
    return short_repr(value)


def _model_ref(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail("", f"expected a model reference (hub id or directory), got {_short(value)}")
    if "+" in value and not all(part.strip() for part in value.split("+", 1)):
        raise _fail("", f"expected 'base_model+adapter' (both parts non-empty), got '{value}'")
    if value.count("@") > 1:
        raise _fail("", f"at most one '@' (before the revision), got '{value}'")
    return value


def _layer_range(value: Any) -> tuple[int, int]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise _fail("", f"expected [start, end] (two integers, end exclusive), got {_short(value)}")
    start, end = value
    if start < 0:
        raise _fail("", f"start must be >= 0, got {list(value)}")
    if end <= start:
        raise _fail("", f"end must be greater than start, got {list(value)}")
    return (start, end)


def _setting(value: Any) -> Any:
    try:
        return check_setting(value)
    except SettingError as err:
        raise _fail(err.subpath, err.message) from None


def _dtype(value: Any) -> str:
    name = value.removeprefix("torch.") if isinstance(value, str) else None
    if name not in RECIPE_DTYPES:
        raise _fail("", f"unknown dtype {_short(value)}; known: {', '.join(RECIPE_DTYPES)}")
    return value


ModelRef = Annotated[str, BeforeValidator(_model_ref)]
LayerRange = Annotated[tuple[int, int], BeforeValidator(_layer_range)]
Setting = Annotated[Any, BeforeValidator(_setting)]
Parameters = dict[str, Setting]
DType = Annotated[str, BeforeValidator(_dtype)]


class _Section(BaseModel):
    """Base of every recipe mapping: unknown keys are errors that name the key."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, BaseModel):
            return data
        if not isinstance(data, dict):
            raise _fail("", f"expected a mapping, got {_short(data)}")
        allowed = list(cls.model_fields)
        for key in data:
            if key not in cls.model_fields:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise _fail(f".{key}", f"unknown key{hint}; allowed here: {', '.join(allowed)}")
        return data


class ModelEntry(_Section):
    """One entry of ``models:``."""

    model: ModelRef
    parameters: Parameters | None = None


class SliceSource(_Section):
    """One source of a slice: layers ``[start, end)`` of ``model``."""

    model: ModelRef
    layer_range: LayerRange
    parameters: Parameters | None = None


class Slice(_Section):
    """One output slice: its sources are merged layer by layer."""

    sources: list[SliceSource]
    base_model: ModelRef | None = None
    residual_weight: float | None = None  # accepted like mergekit, which does not use it either
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _same_lengths(self) -> Slice:
        if not self.sources:
            raise _fail(".sources", "a slice needs at least one source")
        first = self.sources[0].layer_range
        for i, src in enumerate(self.sources):
            (a, b), (a0, b0) = src.layer_range, first
            if b - a != b0 - a0:
                raise _fail(
                    f".sources[{i}].layer_range",
                    f"covers {b - a} layers but sources[0] covers {b0 - a0}; "
                    "all sources of a slice must cover the same number of layers",
                )
        _no_duplicates([s.model for s in self.sources], ".sources")
        return self


def _no_duplicates(refs: list[str], list_path: str) -> None:
    seen: dict[str, int] = {}
    for i, ref in enumerate(refs):
        if ref in seen:
            raise _fail(f"{list_path}[{i}].model", f"'{ref}' is already {list_path.lstrip('.')}[{seen[ref]}]")
        seen[ref] = i


def _one_of_inputs(section: Any, where: str) -> None:
    given = [k for k in ("models", "slices", "modules") if getattr(section, k, None) is not None]
    options = "'models' or 'slices'" if where else "'models', 'slices' or 'modules'"
    if len(given) != 1:
        found = f" (found {', '.join(given)})" if given else ""
        raise _fail("", f"{where or 'a recipe'} needs exactly one of {options}{found}")
    for key in given:
        if not getattr(section, key):
            raise _fail(f".{key}", "must not be empty")
    if getattr(section, "models", None):
        _no_duplicates([m.model for m in section.models], ".models")


class Module(_Section):
    """One entry of ``modules:`` (mergekit's multi-module syntax)."""

    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _inputs(self) -> Module:
        _one_of_inputs(self, "a module")
        return self


class TokenizerSection(_Section):
    """mergekit's ``tokenizer:`` section."""

    source: ModelRef = "union"
    tokens: dict[str, Any] | None = None
    pad_to_multiple_of: int | None = None


class Recipe(_Section):
    """A validated merge recipe.  Build with :func:`parse_recipe` / :func:`load_recipe`."""

    merge_method: str
    base_model: ModelRef | None = None
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    modules: dict[str, Module] | None = None
    parameters: Parameters | None = None
    dtype: DType | None = None
    out_dtype: DType | None = None
    tokenizer_source: ModelRef | None = None
    tokenizer: TokenizerSection | None = None
    chat_template: str | None = None

    @model_validator(mode="after")
    def _structure(self) -> Recipe:
        _one_of_inputs(self, "")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise _fail(".tokenizer", "give either tokenizer_source or tokenizer, not both")
        return self

    @model_validator(mode="after")
    def _method(self) -> Recipe:
        # Raised as RecipeError (not a pydantic error) so the path and text come out as written.
        check_method_parameters(self)
        return self

    def referenced_models(self) -> list[str]:
        """Every model reference of the merge inputs, in order of first appearance, base last."""
        refs: list[str] = []
        for _path, section in self.input_sections():
            for entry in section.models or []:
                refs.append(entry.model)
            for sl in section.slices or []:
                refs.extend(src.model for src in sl.sources)
                if sl.base_model:
                    refs.append(sl.base_model)
        if self.base_model:
            refs.append(self.base_model)
        return list(dict.fromkeys(refs))

    def input_sections(self) -> list[tuple[str, Recipe | Module]]:
        """(YAML path prefix, section) of each place that holds ``models``/``slices``."""
        if self.modules:
            return [(f"modules.{name}.", module) for name, module in self.modules.items()]
        return [("", self)]

    def to_dict(self) -> dict[str, Any]:
        """Plain data of the recipe (unset keys left out), as mergekit's YAML has it."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        """YAML that mergekit-yaml accepts unchanged and :func:`parse_recipe` reads back equal."""
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


class _Dumper(yaml.SafeDumper):
    """Numeric lists in flow style (``layer_range: [0, 8]``), multi-line text as blocks."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = bool(data) and all(isinstance(v, (int, float, bool)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(str, _represent_str)


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_TYPE_MESSAGES = {
    "missing": "required key is missing",
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
}


def recipe_error_from(err: ValidationError) -> RecipeError:
    """The first problem of a pydantic ValidationError as a one-line RecipeError."""
    errors = err.errors()
    first = errors[0]
    path = _path(first["loc"])
    if first["type"] == "recipe_error":
        sub = first["ctx"]["subpath"]
        path = (path + sub) if path else sub.lstrip(".")
        message = first["ctx"]["message"]
    elif first["type"] in _TYPE_MESSAGES:
        message = _TYPE_MESSAGES[first["type"]]
        if first["type"] != "missing":
            message += f", got {_short(first.get('input'))}"
    else:
        message = str(first["msg"]).removeprefix("Value error, ")
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return RecipeError(path, message)


def parse_recipe(data: str | dict[str, Any], *, source: str = "recipe") -> Recipe:
    """Validate a recipe given as YAML text or as already-parsed data.

    ``source`` names the file in YAML syntax errors.  Raises RecipeError (one line).
    """
    if isinstance(data, str):
        data = load_yaml_text(data, source)
    if not isinstance(data, dict):
        raise RecipeError("", f"{source}: a recipe is a YAML mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise recipe_error_from(err) from None


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Validate a recipe given as plain data (what ``yaml.safe_load`` returns)."""
    return parse_recipe(data, source="recipe")


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate the recipe file ``path``."""
    path = Path(path)
    return parse_recipe(load_yaml_file(path, "recipe"), source=str(path))


def _parameter_scopes(recipe: Recipe) -> list[tuple[str, dict[str, Any] | None, bool]]:
    """(path, parameters, per_model) of every ``parameters:`` mapping of the recipe."""
    scopes = [("parameters", recipe.parameters, False)]
    for prefix, section in recipe.input_sections():
        if isinstance(section, Module):
            scopes.append((f"{prefix}parameters", section.parameters, False))
        for i, entry in enumerate(section.models or []):
            scopes.append((f"{prefix}models[{i}].parameters", entry.parameters, True))
        for i, sl in enumerate(section.slices or []):
            scopes.append((f"{prefix}slices[{i}].parameters", sl.parameters, False))
            for j, src in enumerate(sl.sources):
                scopes.append((f"{prefix}slices[{i}].sources[{j}].parameters", src.parameters, True))
    return scopes


def check_method_parameters(recipe: Recipe) -> None:
    """The merge method exists, every parameter name is one it reads, and every value given
    fits its type and range.  Raises RecipeError naming the YAML path.

    A per-model ``parameters:`` mapping may only hold the method's per-model parameters
    (mergekit would silently ignore e.g. a per-model ``t`` for slerp).
    """
    from merge_core.methods import get_method, method_names

    try:
        method = get_method(recipe.merge_method)
    except MethodError:
        known = ", ".join(sorted(method_names()))
        raise RecipeError("merge_method", f"unknown merge_method '{recipe.merge_method}'; known: {known}") from None
    global_specs = {p.name: p for p in method.global_params}
    model_specs = {p.name: p for p in method.model_params}
    for path, params, per_model in _parameter_scopes(recipe):
        for name, setting in (params or {}).items():
            spec = model_specs.get(name) or (None if per_model else global_specs.get(name))
            if spec is None:
                if per_model and name in global_specs:
                    raise RecipeError(
                        f"{path}.{name}",
                        f"'{name}' is a global parameter of {method.name}, not a per-model one; "
                        "set it under the top-level or slice parameters",
                    )
                known = sorted(model_specs) if per_model else sorted({**global_specs, **model_specs})
                what = f"known: {', '.join(known)}" if known else "it takes none here"
                raise RecipeError(f"{path}.{name}", f"unknown parameter for merge_method {method.name}; {what}")
            for sub, value in iter_values(setting):
                try:
                    coerce_value(spec, value)
                except MethodError as err:
                    msg = str(err).removeprefix(f"{name}: ")
                    raise RecipeError(f"{path}.{name}{sub}", msg) from None
