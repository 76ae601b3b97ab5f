"""The shared example recipes, used unchanged: they parse, and plan against tiny stand-ins.

Every model they name is planted as a tiny Llama (8 layers) in a temporary Hugging Face cache
under its hub name, so the recipes resolve exactly as they would on a user's machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_model_ref import plant_in_hf_cache

from merge_core.errors import RecipeError
from merge_core.planner import Planner, plan_merge, torch_dtype
from merge_core.recipe import load_recipe
from tiny_models import make_tiny_llama

EXAMPLES = Path(__file__).parent / "data/shared_examples/recipes"
FILES = sorted(EXAMPLES.glob("*.yml"))
LAYERS = 8
EXPECTED_FAILURES = {
    "slerp_gradient_filters.yml": (
        "base_model: 'NousResearch/Nous-Hermes-2-SOLAR-10.7B' is not one of the models merged in slices[0]; "
        "merge_method slerp needs its base_model among the merged models"
    ),
}



@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HF cache holding a tiny model under every name the examples reference."""
    root = tmp_path_factory.mktemp("examples")
    cache = root / "hub"
    names = sorted({ref for f in FILES for ref in load_recipe(f).referenced_models()})
    for seed, name in enumerate(names):
        model = make_tiny_llama(root / "src" / f"m{seed}", seed=seed, tokenizer=False, num_hidden_layers=LAYERS)
        plant_in_hf_cache(cache, name, model)
    return cache


@pytest.fixture
def offline_cache(hub_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no stray local directory may shadow a hub name
    return hub_cache


@pytest.mark.parametrize("file", FILES, ids=[f.name for f in FILES])
def test_example_parses_and_round_trips(file: Path):
    recipe = load_recipe(file)
    assert recipe.merge_method
    assert load_recipe(file).to_yaml() == recipe.to_yaml()


@pytest.mark.parametrize("file", FILES, ids=[f.name for f in FILES])
def test_example_plans(file: Path, offline_cache: Path):
    recipe = load_recipe(file)
    if file.name in EXPECTED_FAILURES:
        with pytest.raises(RecipeError) as err:
            plan_merge(recipe, relative_to=file.parent)
        assert str(err.value) == EXPECTED_FAILURES[file.name]
        return
    plan = plan_merge(recipe, relative_to=file.parent)
    assert len(plan.tasks) == 1 + LAYERS * 9 + 2
    assert all(p.path.is_relative_to(offline_cache) for p in plan.models)
    assert {t.method for t in plan.tasks} == {recipe.merge_method}
    assert plan.out_config["num_hidden_layers"] == LAYERS
    assert plan.dtype == torch_dtype(recipe.dtype) and (plan.dtype is None or isinstance(plan.dtype, torch.dtype))


def _tasks(file_name: str) -> tuple:
    plan = plan_merge(load_recipe(EXAMPLES / file_name))
    return plan, {t.output: t for t in plan.tasks}


def test_slerp_q_proj_only_values(offline_cache: Path):
    plan, tasks = _tasks("slerp_q_proj_only.yml")
    assert [m.reference for m in plan.models] == ["model1", "model2"] and plan.base_model == 0
    for name, task in tasks.items():
        assert task.base_index == 0
        assert task.params.global_ == {"t": 0.5 if "q_proj" in name else 0.0}, name


def test_ties_three_models_values(offline_cache: Path):
    plan, tasks = _tasks("ties_three_models.yml")
    assert plan.models[plan.base_model].reference == "mistralai/Mistral-7B-v0.1"
    mlp, attn = tasks["model.layers.5.mlp.up_proj.weight"], tasks["model.layers.5.self_attn.v_proj.weight"]
    for task in (mlp, attn):
        assert task.base_index == 0 and task.params.per_model[0] == {}
        assert task.params.global_["normalize"] is True and task.params.global_["int8_mask"] is True
        assert task.params.per_model[2] == {"weight": 0.5, "density": 0.5}
    assert mlp.params.per_model[1] == {"weight": 0.5, "density": 0.5}
    assert attn.params.per_model[1] == {"weight": 0.0, "density": 0.5}


def test_sce_appends_unlisted_base(offline_cache: Path):
    plan, tasks = _tasks("sce_four_models.yml")
    assert len(plan.models) == 5 and plan.base_model == 4
    task = tasks["model.norm.weight"]
    assert task.base_index == 4 and len(task.sources) == 5
    assert task.params.per_model == [{}] * 5


def test_planner_reuses_example_models(offline_cache: Path):
    """The evolve loop's path: one Planner, many recipes over the same models."""
    files = [f for f in FILES if f.name not in EXPECTED_FAILURES]
    planner = Planner()
    for file in files:
        planner.plan(load_recipe(file))
    loaded = dict(planner.models)
    for file in files:
        planner.plan(load_recipe(file))
    assert planner.models == loaded


def test_vendored_examples_match_shared() -> None:
    shared = Path(__file__).resolve().parents[2] / "shared" / "examples"
    if not shared.is_dir():
        pytest.skip(f"{shared} not beside this checkout (the vendored copy is used)")
    ours = {p.relative_to(EXAMPLES.parent): p.read_bytes() for p in EXAMPLES.parent.rglob("*") if p.is_file()}
    theirs = {p.relative_to(shared): p.read_bytes() for p in shared.rglob("*") if p.is_file()}
    assert ours == theirs
    assert FILES, "no example recipes found"
