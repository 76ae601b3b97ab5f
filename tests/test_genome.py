"""The genome encoding: layout, bounds, decode to mergekit recipes, encode back, recipe hashes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from evolve.config import parse_evolve_config
from evolve.genome import Genome, GenomeError, recipe_hash

EXAMPLE = Path(__file__).parent / "data/shared_examples/evolve/evol_merge_config.yml"
REPO = Path(__file__).resolve().parents[1]

# (genome overrides, num_layers): every method and layout switch at least once.
VARIANTS = [
    ({"merge_method": "task_arithmetic", "base_model": "base", "layer_granularity": 2, "allow_negative_weights": True}, 4),
    ({"merge_method": "ties", "base_model": "base", "layer_granularity": 2, "filters": ["self_attn", "mlp"]}, 4),
    ({"merge_method": "dare_ties", "base_model": "base", "smooth": True, "layer_granularity": 1}, 4),
    ({"merge_method": "della", "base_model": "base", "layer_granularity": 2, "filters": ["mlp"], "smooth": True}, 4),
    ({"merge_method": "breadcrumbs", "base_model": "base"}, 4),
    ({"merge_method": "dare_linear", "base_model": "base", "layer_granularity": 3}, 4),
    ({"merge_method": "linear", "layer_granularity": 2, "filters": ["mlp"]}, 4),
    ({"merge_method": "linear", "smooth": True, "layer_granularity": 1, "normalize": False}, 4),
    ({"merge_method": "slerp", "layer_granularity": 2}, 4),
    ({"merge_method": "slerp", "layer_granularity": 2, "tokenizer_source": "base"}, 4),
    ({"merge_method": "ties", "base_model": "a"}, 4),  # base also a searched model
    ({"merge_method": "task_arithmetic", "base_model": "base", "layer_granularity": 8}, 32),
    ({"merge_method": "breadcrumbs_ties", "base_model": "base", "layer_granularity": 2, "filters": ["mlp"]}, 4),
    ({"merge_method": "della_linear", "base_model": "base", "smooth": True, "layer_granularity": 2}, 4),
    ({"merge_method": "multislerp", "base_model": "base", "layer_granularity": 2}, 4),
    ({"merge_method": "multislerp", "smooth": True, "layer_granularity": 1, "normalize": False}, 4),
    ({"merge_method": "nuslerp", "base_model": "base", "models": ["a", "b"], "filters": ["self_attn"]}, 4),
    ({"merge_method": "nuslerp", "models": ["a", "b"], "layer_granularity": 2}, 4),
    ({"merge_method": "sce", "base_model": "base", "layer_granularity": 2, "filters": ["mlp"]}, 4),
    ({"merge_method": "sce", "base_model": "base", "smooth": True, "layer_granularity": 1}, 4),
    ({"merge_method": "nearswap", "base_model": "base", "models": ["a"], "layer_granularity": 2}, 4),
    ({"merge_method": "ram", "base_model": "base", "smooth": True, "layer_granularity": 2}, 4),
    ({"merge_method": "ramplus_tl", "base_model": "base", "layer_granularity": 2, "filters": ["mlp"]}, 4),
    ({"merge_method": "ramplus_tl", "base_model": "base", "smooth": True, "layer_granularity": 1}, 4),
]


def make_genome(overrides: dict, num_layers: int, models=("a", "b", "c")) -> Genome:
    config = parse_evolve_config({"genome": {"models": list(models), **overrides}, "tasks": ["t"]})
    return Genome(config.genome, num_layers)


def random_points(genome: Genome, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lo, hi = (np.asarray(b) for b in genome.bounds)
    return [rng.uniform(lo, hi) for _ in range(n)]


def test_example_genome_dimension():
    config = parse_evolve_config(yaml.safe_load(EXAMPLE.read_text()))
    # Mistral-7B: 32 layers / granularity 8 = 4 groups x 3 models x 1 filter set x 1 gene (weight)
    genome = Genome(config.genome, 32)
    assert genome.shape == (4, 3, 1, 1) and genome.dimension == 12
    assert genome.bounds == ([-2.0] * 12, [2.0] * 12)  # allow_negative_weights: true, task vectors up to 2
    # the same config on a 4-layer toy: granularity 8 > 4 layers -> one group
    assert Genome(config.genome, 4).dimension == 3


@pytest.mark.parametrize("overrides, layers, expected_shape", [
    ({"merge_method": "ties", "base_model": "base", "layer_granularity": 2, "filters": ["self_attn", "mlp"]}, 4,
     (2, 3, 3, 2)),
    ({"merge_method": "della", "base_model": "base"}, 4, (1, 3, 1, 2)),
    ({"merge_method": "slerp", "layer_granularity": 1}, 4, (4, 3, 1, 1)),
    ({"merge_method": "linear", "layer_granularity": 3}, 8, (3, 3, 1, 1)),
])
def test_dimension_formula(overrides, layers, expected_shape):
    genome = make_genome(overrides, layers)
    assert genome.shape == expected_shape
    assert genome.dimension == math.prod(expected_shape)
    assert len(genome.bounds[0]) == len(genome.bounds[1]) == genome.dimension


@pytest.mark.parametrize("layers", [1, 4, 7, 12, 32])
@pytest.mark.parametrize("granularity", [0, 1, 2, 3, 5, 8, 40])
def test_layer_groups_cover_every_layer_exactly_once(layers, granularity):
    genome = make_genome({"merge_method": "linear", "layer_granularity": granularity}, layers)
    covered = [layer for start, end in genome.layer_ranges for layer in range(start, end)]
    assert covered == list(range(layers))
    recipe = genome.decode(genome.initial_point(False, np.random.default_rng(0)))
    assert [s["sources"][0]["layer_range"] for s in recipe["slices"]] == [list(r) for r in genome.layer_ranges]


def test_bounds_and_initial_points():
    genome = make_genome({"merge_method": "ties", "base_model": "base", "layer_granularity": 2}, 4)
    lo, hi = genome.bounds
    assert lo == [0.0, 0.0] * 6 and hi == [2.0, 1.0] * 6  # (weight, density) per (group, model)
    assert genome.scales == [2.0, 1.0] * 6  # the step scales with the box's width
    x0 = genome.initial_point(False, np.random.default_rng(0))
    assert x0 == [1 / 3, 1.0] * 6  # mergekit-evolve's start: weight 1/M, density 1
    r1 = genome.initial_point(True, np.random.default_rng(5))
    assert r1 == genome.initial_point(True, np.random.default_rng(5))
    assert r1 != genome.initial_point(True, np.random.default_rng(6))
    assert all(a <= v <= b for a, v, b in zip(lo, r1, hi))
    neg = make_genome({"merge_method": "task_arithmetic", "base_model": "base", "allow_negative_weights": True}, 4)
    assert neg.bounds == ([-2.0] * 3, [2.0] * 3)
    assert make_genome({"merge_method": "linear"}, 4).bounds == ([0.0] * 3, [1.0] * 3)  # normalized: ratios
    assert make_genome({"merge_method": "slerp"}, 4).bounds == ([0.0] * 3, [4.0] * 3)


def test_the_search_box_is_the_users():
    boxed = make_genome({"merge_method": "ties", "base_model": "base", "weight_range": [0.5, 3.0],
                         "density_range": [0.2, 0.9]}, 4, models=("a", "b"))
    assert boxed.bounds == ([0.5, 0.2] * 2, [3.0, 0.9] * 2)
    assert boxed.scales == pytest.approx([2.5, 0.7] * 2)
    params = boxed.decode([4.0, 0.05, 1.2, 0.5])["slices"][0]["sources"]
    assert params[0]["parameters"] == {"weight": 3.0, "density": 0.2}  # clipped into the box
    assert params[1]["parameters"] == {"weight": 1.2, "density": 0.5}
    assert boxed.box_json() == {"weight": [0.5, 3.0], "density": [0.2, 0.9]}
    # The start (weight 1/M, density 1) is brought into the box: CMA-ES starts inside its bounds.
    assert boxed.initial_point(False, np.random.default_rng(0)) == [0.5, 0.9] * 2


def test_a_stored_run_keeps_its_box():
    from evolve.genome import Genome

    definition = make_genome({"merge_method": "ties", "base_model": "base"}, 4).definition
    assert Genome.for_run(definition, 4, None).box["weight"] == (0.0, 2.0)  # a new run: the default
    old = Genome.for_run(definition, 4, {"seed": 0})  # a manifest of 0.1: the box of 0.1
    assert old.box == {"weight": (0.0, 1.0), "density": (0.0, 1.0)} and old.scales == [1.0] * old.dimension
    stored = Genome.for_run(definition, 4, {"genome_box": {"weight": [0.0, 1.5], "density": [0.0, 1.0]}})
    assert stored.box["weight"] == (0.0, 1.5)


@pytest.mark.parametrize("genome, message", [
    ({"merge_method": "ties", "weight_range": [1.0, 1.0]}, "low < high"),
    ({"merge_method": "ties", "weight_range": [-1.0, 1.0]}, "needs allow_negative_weights"),
    ({"merge_method": "ties", "density_range": [0.0, 1.5]}, r"within \[0, 1\]"),
    ({"merge_method": "task_arithmetic", "density_range": [0.1, 0.9]}, "has no density gene"),
    ({"merge_method": "slerp", "base_model": None, "weight_range": [0.0, 1.0]}, "has no weight gene"),
    ({"merge_method": "ties", "weight_range": [0.0, float("inf")]}, "low < high"),
])
def test_bad_search_boxes_name_the_field(genome, message):
    from evolve.config import parse_evolve_config
    from merge_core.errors import RecipeError

    data = {"genome": {"models": ["a", "b"], "base_model": "base", **genome}, "tasks": ["t"]}
    with pytest.raises(RecipeError, match=message) as info:
        parse_evolve_config(data)
    assert str(info.value).startswith("genome.")


@pytest.mark.parametrize("overrides, layers", VARIANTS)
def test_round_trip_over_random_points(overrides, layers):
    genome = make_genome(overrides, layers)
    for x in random_points(genome, 60, seed=layers + len(str(overrides))):
        recipe = genome.decode(x)
        back = genome.encode(recipe)
        assert len(back) == genome.dimension
        assert recipe_hash(genome.decode(back)) == recipe_hash(recipe)
        if overrides["merge_method"] != "slerp":  # slerp keeps only the top two scores per group
            np.testing.assert_allclose(back, x, rtol=0, atol=1e-12)
        json.dumps(recipe, allow_nan=False)  # plain JSON/YAML data


def test_decoded_recipe_structure_task_arithmetic_with_filters():
    genome = make_genome({"merge_method": "ties", "base_model": "base", "layer_granularity": 2,
                          "filters": ["self_attn", "mlp"]}, 4)
    x = np.arange(genome.dimension, dtype=float) / genome.dimension
    recipe = genome.decode(x)
    assert recipe["merge_method"] == "ties" and recipe["base_model"] == "base"
    assert recipe["parameters"] == {"normalize": True, "int8_mask": True}  # ties normalizes by default
    assert recipe["dtype"] == "bfloat16"
    first = recipe["slices"][1]["sources"][2]  # group 1, model c
    assert first["model"] == "c" and first["layer_range"] == [2, 4]
    # genes of (g=1, m=2): offset ((1*3+2)*3+f)*2+p
    w = [x[((1 * 3 + 2) * 3 + f) * 2] for f in range(3)]
    assert first["parameters"]["weight"] == [
        {"filter": "self_attn", "value": w[0]}, {"filter": "mlp", "value": w[1]}, {"value": w[2]}]
    assert recipe["slices"][0]["sources"][-1] == {"model": "base", "layer_range": [0, 2]}


def test_decode_applies_mergekit_evolve_maps_outside_bounds():
    genome = make_genome({"merge_method": "dare_ties", "base_model": "base"}, 4, models=("a", "b"))
    recipe = genome.decode([-0.3, 1.7, 0.2, -0.4])
    a, b = (s["parameters"] for s in recipe["slices"][0]["sources"][:2])
    assert a == {"weight": 0.3, "density": 1.0}  # |w| without negatives; density clamp(|d|, 0, 1)
    assert b == {"weight": 0.2, "density": 0.4}
    signed = make_genome({"merge_method": "task_arithmetic", "base_model": "base", "allow_negative_weights": True},
                         4, models=("a", "b"))
    assert signed.decode([-0.3, 0.5])["slices"][0]["sources"][0]["parameters"] == {"weight": -0.3}
    with pytest.raises(GenomeError):
        genome.decode([0.1, 0.2])
    with pytest.raises(GenomeError):
        genome.decode([0.1, float("nan"), 0.2, 0.3])


def test_della_epsilon_keeps_density_window_valid():
    genome = make_genome({"merge_method": "della", "base_model": "base", "layer_granularity": 1}, 4)
    for x in random_points(genome, 20, seed=3) + [np.array([0.5, 1.0, 0.5, 0.0] * 6)]:
        for sl in genome.decode(x)["slices"]:
            for src in sl["sources"][:3]:
                d, eps = src["parameters"]["density"], src["parameters"]["epsilon"]
                assert 0 <= eps <= 0.15
                assert d in (0.0, 1.0) or 0 < d - eps and d + eps < 1


def test_slerp_picks_top_two_and_softmax_t():
    genome = make_genome({"merge_method": "slerp", "layer_granularity": 2}, 4)
    recipe = genome.decode([0.5, 3.0, 2.0, 1.0, 1.0, 1.0])  # group 0: b > c > a; group 1: tie
    s0, s1 = recipe["slices"]
    assert [s["model"] for s in s0["sources"]] == ["b", "c"] and s0["base_model"] == "b"
    assert s0["parameters"]["t"] == pytest.approx(1 / (1 + math.exp(1.0)))
    assert [s["model"] for s in s1["sources"]] == ["a", "b"]  # ties keep model order
    assert s1["parameters"]["t"] == pytest.approx(0.5)
    assert "base_model" not in recipe and "parameters" not in recipe
    extreme = genome.decode([0.0, 4.0, 0.0, 4.0, 0.0, 0.0])["slices"][0]["parameters"]["t"]
    assert extreme == pytest.approx(0.01799, abs=1e-5)  # the smallest t the bounds allow


def test_smooth_writes_gradients_in_models_section():
    genome = make_genome({"merge_method": "task_arithmetic", "base_model": "base", "layer_granularity": 1,
                          "smooth": True}, 4, models=("a", "b"))
    x = [0.1, 0.5, 0.2, 0.6, 0.3, 0.7, 0.4, 0.8]
    recipe = genome.decode(x)
    assert "slices" not in recipe
    assert recipe["models"] == [
        {"model": "a", "parameters": {"weight": [0.1, 0.2, 0.3, 0.4]}},
        {"model": "b", "parameters": {"weight": [0.5, 0.6, 0.7, 0.8]}},
        {"model": "base"},
    ]
    one_group = make_genome({"merge_method": "task_arithmetic", "base_model": "base", "smooth": True}, 4,
                            models=("a", "b"))
    assert one_group.decode([0.25, 0.75])["models"][0]["parameters"] == {"weight": 0.25}  # scalar, not [0.25]


def test_encode_rejects_foreign_recipes():
    genome = make_genome({"merge_method": "ties", "base_model": "base"}, 4)
    other = make_genome({"merge_method": "ties", "base_model": "base", "layer_granularity": 2}, 4)
    recipe = other.decode(other.initial_point(False, np.random.default_rng(0)))
    with pytest.raises(GenomeError):
        genome.encode(recipe)
    with pytest.raises(GenomeError):
        genome.encode({**recipe, "merge_method": "linear"})


def test_recipe_hash_rounds_and_ignores_key_order():
    genome = make_genome({"merge_method": "ties", "base_model": "base"}, 4)
    x = np.array(genome.initial_point(True, np.random.default_rng(1)))
    h = recipe_hash(genome.decode(x))
    assert recipe_hash(genome.decode(x + 1e-13)) == h
    assert recipe_hash(genome.decode(x + 1e-6)) != h
    reordered = dict(reversed(list(genome.decode(x).items())))
    assert recipe_hash(reordered) == h
    assert recipe_hash({"w": -0.0}) == recipe_hash({"w": 0.0})
    assert len(h) == 64 and int(h, 16) >= 0


def test_recipe_hash_is_stable_across_processes():
    code = ("from evolve.genome import recipe_hash;"
            "print(recipe_hash({'merge_method': 'linear', 'slices': [{'w': 0.1 + 0.2, 'm': 'a'}], 'z': {'b': 1, 'a': 2}}))")
    outs = {
        subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": str(s), "PATH": "/usr/bin"}).stdout.strip()
        for s in (0, 1)
    }
    assert outs == {recipe_hash({"merge_method": "linear", "slices": [{"w": 0.3, "m": "a"}], "z": {"a": 2, "b": 1}})}


def test_decoded_recipes_parse_with_merge_core():
    """Our own recipe model (which the in-memory merge uses) accepts every decoded layout."""
    recipe_mod = pytest.importorskip("merge_core.recipe")
    for overrides, layers in VARIANTS:
        genome = make_genome(overrides, layers)
        for x in random_points(genome, 3, seed=2):
            recipe_mod.parse_recipe(genome.decode(x))


def _mergekit_recipes(tiny_models=None) -> list[dict]:
    recipes = []
    for overrides, layers in VARIANTS:
        if tiny_models is not None:
            if layers != 4:
                continue
            names = {"a": str(tiny_models["a"]), "b": str(tiny_models["b"]), "c": str(tiny_models["c"]),
                     "base": str(tiny_models["base"])}
            overrides = {k: names.get(v, v) if k == "base_model" else [names[m] for m in v] if k == "models" else v
                         for k, v in overrides.items()}
            genome = make_genome(overrides, layers, models=(names["a"], names["b"], names["c"]))
        else:
            genome = make_genome(overrides, layers)
        for x in random_points(genome, 3, seed=7):
            recipes.append(genome.decode(x))
    return recipes


@pytest.mark.slow  # importing mergekit takes ~15 s
@pytest.mark.mergekit
def test_decoded_recipes_validate_with_mergekit(mergekit_py):
    recipes = _mergekit_recipes()
    code = (
        "import json, sys\n"
        "from mergekit.config import MergeConfiguration\n"
        "for i, r in enumerate(json.load(sys.stdin)):\n"
        "    MergeConfiguration.model_validate(r)\n"
        "print('validated', i + 1)\n"
    )
    out = subprocess.run([mergekit_py, "-c", code], input=json.dumps(recipes), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"validated {len(recipes)}"


@pytest.mark.slow
@pytest.mark.mergekit
def test_decoded_recipes_merge_with_mergekit_yaml(mergekit_py, tiny_models, tmp_path):
    """Beyond validation: mergekit-yaml really merges the trickiest layouts (della + filters +
    smooth, slerp with a tokenizer source, ties with the base among the models)."""
    cli = Path(mergekit_py).parent / "mergekit-yaml"
    picks = {"della", "slerp", "ties"}
    done = set()
    for recipe in _mergekit_recipes(tiny_models):
        method = recipe["merge_method"]
        if method not in picks or method in done:
            continue
        if method == "slerp" and "tokenizer_source" not in recipe:
            continue
        if method == "della" and "models" not in recipe:
            continue
        path = tmp_path / f"{method}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        out = subprocess.run([str(cli), str(path), str(tmp_path / f"out_{method}")], capture_output=True, text=True)
        assert out.returncode == 0, f"{method}: {out.stderr[-1500:]}"
        assert list((tmp_path / f"out_{method}").glob("*.safetensors"))
        done.add(method)
    assert done == picks
