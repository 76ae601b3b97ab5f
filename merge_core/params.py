"""Parameter settings of a recipe: their allowed shapes, and their value for one tensor.

A setting (the value of a key under ``parameters:``) is, as in mergekit 0.1.5, one of

* a scalar: ``0.5``, ``true`` (numeric strings such as ``"1e-3"`` count as numbers);
* a gradient: a list of scalars, interpolated linearly over the layers of a slice;
* a filter entry ``{filter: self_attn, value: ...}`` or a list of them: the first entry whose
  ``filter`` is a substring of the tensor name (or that has no filter, or ``filter: "*"``)
  gives the value, itself a scalar or a gradient.

Settings are stored as plain YAML data (scalars, lists, ``{filter, value}`` dicts) so recipes
stay easy to build and edit programmatically (the evolve loop rewrites values in place).
Evaluation follows mergekit's ``evaluate_setting`` exactly: a gradient of ``n`` numbers at
position ``t`` in [0, 1] gives ``(1 - f) * v[i] + f * v[i + 1]`` with ``i = int(t * (n - 1))``;
a gradient of booleans picks ``v[int(t * (n - 1))]``.  A filter list that matches nothing, and an
empty list, give "no value", and the next (lower precedence) scope is consulted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from merge_core.errors import MethodError, RecipeError
from merge_core.methods.base import ParamSpec, ParamValue
from merge_core.yaml_io import short_repr

Scalar = bool | int | float | str
_SCALARS = (bool, int, float, str)
_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False,
               "1": True, "0": False, "t": True, "f": False, "y": True, "n": False}


class SettingError(ValueError):
    """A setting has the wrong shape; ``subpath`` locates the bad part (``[1].value``)."""

    def __init__(self, subpath: str, message: str) -> None:
        self.subpath = subpath
        self.message = message
        super().__init__(f"{subpath}: {message}" if subpath else message)


def _short(value: Any) -> str:
    return short_repr(value)


def _check_value(raw: Any, subpath: str) -> Any:
    """A scalar or a gradient (list of scalars); returns it with lists as plain lists."""
    if isinstance(raw, _SCALARS):
        return raw
    if isinstance(raw, (list, tuple)):
        for i, item in enumerate(raw):
            if not isinstance(item, _SCALARS):
                raise SettingError(f"{subpath}[{i}]", f"a gradient holds numbers, got {_short(item)}")
        return list(raw)
    raise SettingError(subpath, f"expected a number, a list of numbers or filter entries, got {_short(raw)}")


def _check_entry(raw: dict, subpath: str) -> dict:
    unknown = sorted(set(map(str, raw)) - {"filter", "value"})
    if unknown:
        raise SettingError(f"{subpath}.{unknown[0]}", "unknown key in a filter entry; allowed: filter, value")
    if "value" not in raw:
        raise SettingError(f"{subpath}.value", "a filter entry needs a value")
    flt = raw.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise SettingError(f"{subpath}.filter", f"expected a string, got {_short(flt)}")
    value = raw["value"]
    if isinstance(value, (list, tuple)) and any(isinstance(v, dict) for v in value):
        raise SettingError(f"{subpath}.value", "filter entries cannot be nested")
    entry = {"filter": flt} if flt is not None else {}
    entry["value"] = _check_value(value, f"{subpath}.value")
    return entry


def check_setting(raw: Any) -> Any:
    """Validate the shape of one setting and return it normalised (lists, dict entries).

    Raises :class:`SettingError` naming the bad part relative to the setting.
    """
    if isinstance(raw, dict):
        return _check_entry(raw, "")
    if isinstance(raw, (list, tuple)) and any(isinstance(item, dict) for item in raw):
        entries = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise SettingError(f"[{i}]", f"expected a {{filter, value}} entry, got {_short(item)}")
            entries.append(_check_entry(item, f"[{i}]"))
        return entries
    return _check_value(raw, "")


def iter_values(setting: Any) -> Iterator[tuple[str, Scalar]]:
    """Every scalar in ``setting`` with its subpath (``[0].value[2]``), for load-time checks."""
    if isinstance(setting, dict):
        yield from ((f".value{sub}", v) for sub, v in iter_values(setting["value"]))
    elif isinstance(setting, list):
        for i, item in enumerate(setting):
            if isinstance(item, dict):
                yield from ((f"[{i}]{sub}", v) for sub, v in iter_values(item))
            else:
                yield f"[{i}]", item
    else:
        yield "", setting


def coerce_value(spec: ParamSpec, raw: Any) -> ParamValue:
    """``raw`` converted to ``spec``'s kind the way mergekit's pydantic types do, then checked.

    Numeric strings (``"1e-3"``) are numbers, booleans count as 0/1 for numeric parameters, and
    an integer parameter refuses a fractional value.  Raises MethodError.
    """
    value = raw
    if spec.kind == "bool":
        if isinstance(value, str):
            word = value.strip().lower()
            if word not in _BOOL_WORDS:
                raise MethodError(f"{spec.name}: expected true/false, got {_short(raw)}")
            value = _BOOL_WORDS[word]
        elif isinstance(value, float) and value in (0.0, 1.0):
            value = bool(value)
        return spec.check(value)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise MethodError(f"{spec.name}: expected a number, got {_short(raw)}") from None
    if isinstance(value, bool):
        value = int(value)
    if spec.kind == "int" and isinstance(value, float):
        if not value.is_integer():
            raise MethodError(f"{spec.name}: expected an integer, got {value!r}")
        value = int(value)
    return spec.check(value)


def _evaluate_value(value: Any, spec: ParamSpec, t: float) -> ParamValue | None:
    if not isinstance(value, list):
        return coerce_value(spec, value)
    if not value:
        return None
    values = [coerce_value(spec, v) for v in value]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    # Same arithmetic, in the same order, as mergekit, so results match to the last bit.
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return coerce_value(spec, (1 - frac) * values[i0] + frac * values[i1])


def filter_matches(flt: str | None, tensor_name: str) -> bool:
    """mergekit's rule: no filter, ``*``, or a substring of the tensor name."""
    return flt is None or flt == "*" or (bool(tensor_name) and flt in tensor_name)


def evaluate_setting(setting: Any, spec: ParamSpec, tensor_name: str, t: float) -> ParamValue | None:
    """The value ``setting`` gives parameter ``spec`` for ``tensor_name`` at gradient position ``t``.

    None when the setting says nothing for this tensor (no filter matched, empty list).
    Raises MethodError when the value does not fit ``spec``.
    """
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for entry in setting:
            if filter_matches(entry.get("filter"), tensor_name):
                return _evaluate_value(entry["value"], spec, t)
        return None
    return _evaluate_value(setting, spec, t)


Scope = tuple[str, "dict[str, Any] | None"]
"""A ``parameters:`` mapping and its YAML path (``slices[0].parameters``); highest precedence first."""


def resolve_param(
    spec: ParamSpec,
    scopes: Sequence[Scope],
    tensor_name: str,
    t: float,
    *,
    method: str,
    owner: str | None = None,
    missing_path: str | None = None,
) -> ParamValue | None:
    """Resolve one parameter for one tensor: the first scope that gives a value wins, then
    the spec's default (None for an optional parameter without one: the caller leaves it out).
    ``owner`` (a model reference) and ``missing_path`` (the YAML path to blame when no scope
    sets a required parameter; default: the first scope's) only make errors clearer.

    Raises RecipeError naming the setting's YAML path.
    """
    for path, params in scopes:
        if params is None or spec.name not in params:
            continue
        try:
            value = evaluate_setting(params[spec.name], spec, tensor_name, t)
        except MethodError as err:
            raise RecipeError(f"{path}.{spec.name}", f"{err} (for tensor {tensor_name})") from None
        if value is not None:
            return value
    if spec.required:
        where = f" for '{owner}'" if owner else ""
        path = missing_path or f"{scopes[0][0] if scopes else 'parameters'}.{spec.name}"
        raise RecipeError(
            path,
            f"merge_method {method} needs parameter '{spec.name}'{where}; not set for tensor {tensor_name}",
        )
    return spec.default
