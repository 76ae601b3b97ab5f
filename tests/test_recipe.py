"""Recipe loading, one-line validation errors, and YAML round trips (merge_core.recipe)."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml
from test_params import mergekit_python_or_skip

from merge_core.errors import RecipeError
from merge_core.recipe import Recipe, load_recipe, parse_recipe, recipe_from_dict

TIES = """
merge_method: ties
base_model: org/base
models:
  - model: org/base
  - model: org/a
    parameters:
      density: 0.5
      weight: [{filter: mlp, value: [0, 1]}, {value: 0.2}]
  - model: org/b@v1.0
    parameters: {density: "5e-1", weight: 0.5}
parameters: {normalize: true, int8_mask: true}
dtype: float16
out_dtype: bfloat16
tokenizer_source: union
chat_template: "{% for m in messages %}{{ m.content }}\\n{% endfor %}"
"""

SLICES = """
merge_method: slerp
base_model: org/a
slices:
  - sources:
      - {model: org/a, layer_range: [0, 4], parameters: {}}
      - {model: org/b, layer_range: [2, 6]}
    parameters:
      t: [{filter: self_attn, value: [0, 0.5, 1]}, {value: 0.5}]
  - sources: [{model: org/a, layer_range: [4, 8]}, {model: org/b, layer_range: [4, 8]}]
    base_model: org/b
    residual_weight: 0.1
parameters: {t: 0.3}
tokenizer: {source: base}
"""

MODULES = """
merge_method: linear
modules:
  default:
    models: [{model: org/a, parameters: {weight: 1}}, {model: org/b, parameters: {weight: 2}}]
    parameters: {normalize: false}
"""


def error_of(text: str) -> str:
    with pytest.raises(RecipeError) as err:
        parse_recipe(textwrap.dedent(text))
    message = str(err.value)
    assert "\n" not in message
    return message


def test_parse_models_recipe():
    r = parse_recipe(TIES)
    assert r.merge_method == "ties" and r.base_model == "org/base"
    assert [m.model for m in r.models] == ["org/base", "org/a", "org/b@v1.0"]
    assert r.models[1].parameters["weight"] == [{"filter": "mlp", "value": [0, 1]}, {"value": 0.2}]
    assert r.referenced_models() == ["org/base", "org/a", "org/b@v1.0"]
    assert r.dtype == "float16" and r.out_dtype == "bfloat16" and r.tokenizer_source == "union"


def test_parse_slices_and_modules():
    r = parse_recipe(SLICES)
    assert r.slices[0].sources[1].layer_range == (2, 6)
    assert r.slices[1].base_model == "org/b" and r.tokenizer.source == "base"
    m = parse_recipe(MODULES)
    assert m.modules["default"].parameters == {"normalize": False}
    assert m.input_sections()[0][0] == "modules.default."


@pytest.mark.parametrize("text", [TIES, SLICES, MODULES])
def test_round_trip(text: str):
    r = parse_recipe(text)
    dumped = r.to_yaml()
    again = parse_recipe(dumped)
    assert again == r
    assert again.to_yaml() == dumped
    assert "layer_range: [" in dumped or "slices" not in dumped  # numeric lists in flow style


def test_load_recipe_file(tmp_path: Path):
    file = tmp_path / "r.yml"
    file.write_text(TIES)
    assert load_recipe(file) == parse_recipe(TIES)
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yml")
    file.write_text("merge_method: [ties\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(file)
    assert str(err.value).startswith(f"{file}: invalid YAML at line 2")


@pytest.mark.parametrize(
    ("text", "prefix"),
    [
        ("merge_method: foo\nmodels: [{model: a}]", "merge_method: unknown merge_method 'foo'; known: "),
        ("models: [{model: a}]", "merge_method: required key is missing"),
        ("merge_method: slerp\nmodels: [{model: a}]\nparamters: {t: 1}",
         "paramters: unknown key (did you mean 'parameters'?)"),
        ("merge_method: slerp\nmodels: [{model: a, weight: 1}]", "models[0].weight: unknown key"),
        ("merge_method: slerp\nslices: [{sources: [{model: a, layer_range: [0, 2]}], foo: 1}]",
         "slices[0].foo: unknown key"),
        ("merge_method: ties\nmodels: [{model: a, parameters: {density: 1.5, weight: 1}}]\nbase_model: a",
         "models[0].parameters.density: 1.5 is above the maximum 1.0"),
        ("merge_method: ties\nmodels: [{model: a}]\nparameters: {densty: 0.5}",
         "parameters.densty: unknown parameter for merge_method ties; known: "),
        ("merge_method: ties\nmodels: [{model: a, parameters: {normalize: true}}]",
         "models[0].parameters.normalize: 'normalize' is a global parameter of ties"),
        ("merge_method: ties\nmodels: [{model: a, parameters: {weight: [{filter: x, value: [0, abc]}]}}]",
         "models[0].parameters.weight[0].value[1]: expected a number, got 'abc'"),
        ("merge_method: slerp\nmodels: [{model: a}]\n"
         "parameters: {t: [{filter: x, value: 1}, {filtre: y, value: 2}]}",
         "parameters.t[1].filtre: unknown key in a filter entry"),
        ("merge_method: slerp\nmodels: [{model: a}]\nparameters: {t: {value: [0, [1]]}}",
         "parameters.t.value[1]: a gradient holds numbers"),
        ("merge_method: slerp\nslices:\n - sources:\n   - {model: a, layer_range: [0, 4]}\n"
         "   - {model: b, layer_range: [0, 5]}",
         "slices[0].sources[1].layer_range: covers 5 layers but sources[0] covers 4"),
        ("merge_method: slerp\nslices:\n - sources:\n   - {model: a, layer_range: [4, 2]}",
         "slices[0].sources[0].layer_range: end must be greater than start, got [4, 2]"),
        ("merge_method: slerp\nslices:\n - sources:\n   - {model: a, layer_range: [0, 2, 4]}",
         "slices[0].sources[0].layer_range: expected [start, end]"),
        ("merge_method: slerp\nslices:\n - sources:\n   - {model: a}",
         "slices[0].sources[0].layer_range: required key is missing"),
        ("merge_method: slerp\nslices:\n - sources: []", "slices[0].sources: a slice needs at least one source"),
        ("merge_method: slerp\nslices:\n - sources: [{model: a, layer_range: [0, 1]}, {model: a, layer_range: [1, 2]}]",
         "slices[0].sources[1].model: 'a' is already sources[0]"),
        ("merge_method: slerp\nmodels: [{model: a}, {model: b}, {model: a}]",
         "models[2].model: 'a' is already models[0]"),
        ("merge_method: slerp\nmodels: [{model: 3}]", "models[0].model: expected a model reference"),
        ("merge_method: slerp\nmodels: [{model: 'a+'}]", "models[0].model: expected 'base_model+adapter'"),
        ("merge_method: slerp\nmodels: {model: a}", "models: expected a list"),
        ("merge_method: slerp\nmodels: [a]", "models[0]: expected a mapping, got 'a'"),
        ("merge_method: slerp\nmodels: [{model: a}]\ndtype: float8", "dtype: unknown dtype 'float8'"),
        ("merge_method: slerp\nmodels: [{model: a}]\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}]",
         "a recipe needs exactly one of 'models', 'slices' or 'modules' (found models, slices)"),
        ("merge_method: slerp\nmodels: []", "models: must not be empty"),
        ("merge_method: slerp\nmodels: [{model: a}]\ntokenizer_source: base\ntokenizer: {source: base}",
         "tokenizer: give either tokenizer_source or tokenizer, not both"),
        ("merge_method: slerp\nmodels: [{model: a}]\ntokenizer: {sauce: base}", "tokenizer.sauce: unknown key"),
        ("merge_method: linear\nmodules: {default: {}}",
         "modules.default: a module needs exactly one of 'models' or 'slices'"),
        ("- merge_method: linear", "recipe: a recipe is a YAML mapping"),
    ],
)
def test_one_line_errors_name_the_path(text: str, prefix: str):
    assert error_of(text).startswith(prefix), error_of(text)


def test_unknown_key_error_lists_allowed_keys():
    msg = error_of("merge_method: slerp\nslices: [{sources: [{model: a, layer_range: [0, 2]}], paramters: {}}]")
    assert msg == (
        "slices[0].paramters: unknown key (did you mean 'parameters'?); "
        "allowed here: sources, base_model, residual_weight, parameters"
    )


def test_numeric_strings_and_bools_accepted_like_mergekit():
    r = parse_recipe("merge_method: ties\nmodels: [{model: a, parameters: {weight: '1e-1', density: 1}}]\n"
                     "parameters: {normalize: 'false'}")
    assert r.models[0].parameters["weight"] == "1e-1"  # kept as written; evaluated at plan time


def test_recipe_validate_from_dict_and_copy():
    data = yaml.safe_load(TIES)
    assert recipe_from_dict(data) == parse_recipe(TIES)
    r = Recipe.model_validate(data)
    r2 = r.model_copy(deep=True)
    r2.parameters["normalize"] = False
    assert r.parameters["normalize"] is True and r2 != r


MERGEKIT_ACCEPTS = r"""
import sys, yaml
from mergekit.config import MergeConfiguration
for path in sys.argv[1:]:
    MergeConfiguration.model_validate(yaml.safe_load(open(path)))
print("ok")
"""


@pytest.mark.slow
@pytest.mark.mergekit
def test_dumps_are_accepted_by_mergekit(tmp_path: Path):
    python = mergekit_python_or_skip()
    files = []
    for i, text in enumerate([TIES, SLICES, MODULES]):
        file = tmp_path / f"r{i}.yml"
        file.write_text(parse_recipe(text).to_yaml())
        files.append(str(file))
    examples = Path(__file__).parents[2] / "shared/examples/recipes"
    for file in sorted(examples.glob("*.yml")) if examples.is_dir() else []:
        out = tmp_path / file.name
        out.write_text(load_recipe(file).to_yaml())
        files.append(str(out))
    res = subprocess.run([python, "-c", MERGEKIT_ACCEPTS, *files], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
