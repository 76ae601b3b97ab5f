"""Parameter settings: shapes, gradients, filters, precedence (merge_core.params)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from merge_core.errors import RecipeError
from merge_core.methods.base import MethodError, ParamSpec
from merge_core.params import (
    SettingError,
    check_setting,
    coerce_value,
    evaluate_setting,
    iter_values,
    resolve_param,
)

FLOAT = ParamSpec("t")
BOOL = ParamSpec("normalize", True, kind="bool")
INT = ParamSpec("k", 1, kind="int")
DENSITY = ParamSpec("density", 1.0, minimum=0.0, maximum=1.0)
WEIGHT = ParamSpec("weight", required=True)


def mergekit_python_or_skip() -> str:
    """The mergekit oracle's python (conftest's choice, else /work/mkvenv), or skip."""
    from conftest import mergekit_python

    python = mergekit_python()
    if python is None and Path("/work/mkvenv/bin/python").exists():
        python = "/work/mkvenv/bin/python"
    if python is None:
        pytest.skip("mergekit 0.1.5 oracle not installed")
    return python


def layer_ts(n: int) -> list[float]:
    """mergekit's gradient positions for the n layers of a slice."""
    return [i / (n - 1) if n > 1 else 1.0 for i in range(n)]


def test_gradient_over_four_layers_is_linear():
    values = [evaluate_setting([0, 1], FLOAT, "model.layers.0.mlp", t) for t in layer_ts(4)]
    assert values == pytest.approx([0, 1 / 3, 2 / 3, 1])


def test_five_point_gradient_over_seven_layers():
    # layer k of 7 sits at t = k/6, i.e. at position 4k/6 along the 5 anchors
    values = [evaluate_setting([0, 0.5, 0.3, 0.7, 1], FLOAT, "x", t) for t in layer_ts(7)]
    expected = [0, 0.5 * 2 / 3, 0.5 - 0.2 / 3, 0.3, 0.3 + 0.4 * 2 / 3, 0.7 + 0.3 / 3, 1]
    assert values == pytest.approx(expected)


def test_single_layer_slice_takes_the_last_value():
    assert evaluate_setting([0.2, 0.9], FLOAT, "x", layer_ts(1)[0]) == pytest.approx(0.9)


def test_bool_gradient_picks_discrete_values():
    assert [evaluate_setting([False, True], BOOL, "x", t) for t in layer_ts(4)] == [False, False, False, True]
    assert evaluate_setting([0, 1, 0], BOOL, "x", 0.5) is True


def test_filters_first_match_wins_and_catch_all():
    setting = [{"filter": "self_attn", "value": 0.1}, {"filter": "attn", "value": 0.2}, {"value": 0.3}]
    assert evaluate_setting(setting, FLOAT, "model.layers.0.self_attn.q_proj.weight", 0) == 0.1
    assert evaluate_setting(setting, FLOAT, "model.layers.0.cross_attn.weight", 0) == 0.2
    assert evaluate_setting(setting, FLOAT, "model.layers.0.mlp.up_proj.weight", 0) == 0.3
    star = [{"filter": "mlp", "value": 1}, {"filter": "*", "value": 0.5}]
    assert evaluate_setting(star, FLOAT, "lm_head.weight", 0) == 0.5


def test_filter_value_may_be_a_gradient():
    setting = [{"filter": "mlp", "value": [0, 1]}, {"value": 7}]
    assert evaluate_setting(setting, FLOAT, "model.layers.3.mlp.up_proj.weight", 0.25) == pytest.approx(0.25)
    assert evaluate_setting(setting, FLOAT, "model.norm.weight", 0.25) == 7


def test_no_match_and_empty_list_give_none():
    assert evaluate_setting([{"filter": "mlp", "value": 1}], FLOAT, "model.norm.weight", 0) is None
    assert evaluate_setting({"filter": "mlp", "value": 1}, FLOAT, "model.norm.weight", 0) is None
    assert evaluate_setting([], FLOAT, "x", 0) is None


def test_coercion_like_mergekit():
    assert coerce_value(FLOAT, "1e-3") == pytest.approx(0.001)
    assert coerce_value(FLOAT, True) == 1.0
    assert coerce_value(BOOL, "false") is False
    assert coerce_value(INT, 3.0) == 3
    with pytest.raises(MethodError, match="expected an integer"):
        coerce_value(INT, 2.5)
    with pytest.raises(MethodError, match="expected a number"):
        coerce_value(FLOAT, "abc")
    with pytest.raises(MethodError, match="above the maximum"):
        coerce_value(DENSITY, 1.5)


def test_check_setting_shapes():
    assert check_setting((0, 1)) == [0, 1]
    assert check_setting({"filter": "mlp", "value": (1, 2)}) == {"filter": "mlp", "value": [1, 2]}
    assert check_setting([{"value": 1}]) == [{"value": 1}]
    with pytest.raises(SettingError) as err:
        check_setting([{"filter": "a", "value": 1}, {"filtre": "b", "value": 2}])
    assert err.value.subpath == "[1].filtre"
    with pytest.raises(SettingError) as err:
        check_setting([{"filter": "a", "value": 1}, 0.5])
    assert err.value.subpath == "[1]"
    with pytest.raises(SettingError) as err:
        check_setting([{"filter": 3, "value": 1}])
    assert err.value.subpath == "[0].filter"
    with pytest.raises(SettingError) as err:
        check_setting([{"filter": "a"}])
    assert err.value.subpath == "[0].value"
    with pytest.raises(SettingError) as err:
        check_setting([0, [1]])
    assert err.value.subpath == "[1]"
    with pytest.raises(SettingError):
        check_setting(None)


def test_iter_values_paths():
    setting = [{"filter": "a", "value": [1, 2]}, {"value": 3}]
    assert list(iter_values(setting)) == [("[0].value[0]", 1), ("[0].value[1]", 2), ("[1].value", 3)]
    assert list(iter_values(0.5)) == [("", 0.5)]


def test_precedence_first_scope_with_a_value_wins():
    scopes = [
        ("models[1].parameters", {"weight": [{"filter": "mlp", "value": 0.9}]}),
        ("slices[0].parameters", {"weight": 0.5}),
        ("parameters", {"weight": 0.1, "density": 0.7}),
    ]
    assert resolve_param(WEIGHT, scopes, "model.layers.0.mlp.up_proj.weight", 0, method="ties") == 0.9
    # the model's filter does not match: fall back to the slice, not to the default
    assert resolve_param(WEIGHT, scopes, "model.norm.weight", 0, method="ties") == 0.5
    assert resolve_param(WEIGHT, scopes[2:], "model.norm.weight", 0, method="ties") == 0.1
    assert resolve_param(DENSITY, scopes, "x", 0, method="ties") == 0.7
    assert resolve_param(DENSITY, scopes[:2], "x", 0, method="ties") == 1.0  # default


def test_missing_required_and_bad_value_name_the_path():
    scopes = [("models[2].parameters", None), ("parameters", {})]
    with pytest.raises(RecipeError) as err:
        resolve_param(WEIGHT, scopes, "model.norm.weight", 0, method="ties", owner="m")
    assert str(err.value).startswith("models[2].parameters.weight: merge_method ties needs parameter 'weight' for 'm'")
    with pytest.raises(RecipeError) as err:
        resolve_param(WEIGHT, scopes, "x", 0, method="linear", missing_path="base_model")
    assert str(err.value).startswith("base_model: ")
    with pytest.raises(RecipeError) as err:
        resolve_param(INT, [("parameters", {"k": [1, 2]})], "x", 0.5, method="m")
    assert str(err.value).startswith("parameters.k: k: expected an integer")


ORACLE = r"""
import json, sys
from mergekit.config import evaluate_setting, ConditionalParameter
from pydantic import TypeAdapter
cases = json.loads(sys.stdin.read())
out = []
for setting, name, t, kind in cases:
    if isinstance(setting, dict):
        setting = ConditionalParameter(**setting)
    elif isinstance(setting, list) and setting and isinstance(setting[0], dict):
        setting = [ConditionalParameter(**e) for e in setting]
    ad = TypeAdapter({"float": float, "bool": bool}[kind])
    out.append(evaluate_setting(name, setting, t, validate=ad.validate_python))
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.mergekit
def test_matches_mergekit_evaluate_setting():
    python = mergekit_python_or_skip()
    grads = [[0, 1], [0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0], [0.1, 0.9, 0.2], ["1e-1", 0.4]]
    filt = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.25}, {"value": [1, 0]}]
    names = ["model.layers.3.self_attn.q_proj.weight", "model.layers.3.mlp.up_proj.weight", "model.norm.weight"]
    cases = []
    for n in (1, 2, 4, 7, 13):
        for t in layer_ts(n):
            cases += [[g, names[0], t, "float"] for g in grads]
            cases += [[filt, name, t, "float"] for name in names]
            cases.append([[False, True, False], names[0], t, "bool"])
            cases.append([{"filter": "mlp", "value": 0.3}, names[0], t, "float"])
    res = subprocess.run([python, "-c", ORACLE], input=json.dumps(cases), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    expected = json.loads(res.stdout.strip().splitlines()[-1])
    specs = {"float": FLOAT, "bool": BOOL}
    ours = [evaluate_setting(check_setting(s), specs[k], name, t) for s, name, t, k in cases]
    assert ours == expected  # bit-exact: same arithmetic in the same order
