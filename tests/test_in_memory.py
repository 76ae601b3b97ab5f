"""The in-memory merger (evolve's hot path) gives exactly what the streaming merge-yaml writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merge_core.cli import main as merge_yaml
from merge_core.in_memory import InMemoryMerger
from merge_core.planner import Planner, plan_merge
from merge_core.recipe import recipe_from_dict


def _recipe(models: dict[str, Path], method: str, weights: list, density: list | float = 1.0) -> dict:
    entries = []
    for name, w in zip(("a", "b", "c"), weights):
        params = {"weight": w}
        if method not in ("linear", "task_arithmetic"):
            params["density"] = density
        entries.append({"model": str(models[name]), "parameters": params})
    recipe = {"merge_method": method, "models": entries, "dtype": "float32"}
    if method != "linear":
        recipe["base_model"] = str(models["base"])
    return recipe


def _streamed(recipe: dict, tmp_path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "streamed"
    assert merge_yaml([str(path), str(out), "-q", "--random-seed", str(seed)]) == 0
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della"])
def test_in_memory_equals_streaming(method: str, tiny_models, tmp_path: Path) -> None:
    recipe = _recipe(tiny_models, method, [[0.2, 0.8], 0.5, [{"filter": "mlp", "value": 0.3}, {"value": 0.1}]],
                     density=[0.4, 0.8])
    plan = plan_merge(recipe_from_dict(recipe), seed=3)
    merger = InMemoryMerger(plan)
    ours = merger.merged_state_dict(plan)
    expected = _streamed(recipe, tmp_path, seed=3)
    assert sorted(ours) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_many_candidates_with_warm_caches(tiny_models, tmp_path: Path) -> None:
    """Candidates that differ in parameters only reuse one merger; each equals a fresh merge."""
    planner = Planner()
    first = _recipe(tiny_models, "ties", [0.5, 0.5, 0.5], density=0.5)
    merger = InMemoryMerger(planner.plan(recipe_from_dict(first)))
    target = merger.merged_state_dict(planner.plan(recipe_from_dict(first)))
    for i, (weights, density) in enumerate([([1.0, 0.0, 0.2], 0.3), ([-0.4, 0.9, 0.1], [0.1, 1.0]),
                                            ([0.5, 0.5, 0.5], 0.5)]):
        recipe = _recipe(tiny_models, "ties", weights, density=density)
        merger.merge_into(planner.plan(recipe_from_dict(recipe)), target)
        fresh_plan = plan_merge(recipe_from_dict(recipe))
        fresh = InMemoryMerger(fresh_plan).merged_state_dict(fresh_plan)
        for name in fresh:
            assert torch.equal(target[name], fresh[name]), (i, name)


def test_merge_into_a_live_transformers_model(tiny_models) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["base"], torch_dtype=torch.float32)
    storage_before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    recipe = _recipe(tiny_models, "task_arithmetic", [1.0, 0.0, 0.0])
    plan = plan_merge(recipe_from_dict(recipe))
    merger = InMemoryMerger(plan)
    merger.merge_into(plan, model)
    a = load_file(str(tiny_models["a"] / "model.safetensors"))
    for name, value in model.state_dict().items():
        assert value.data_ptr() == storage_before[name], f"{name} was reallocated"
        torch.testing.assert_close(value, a[name], msg=name)
    ids = torch.tensor([[1, 5, 7, 9]])
    reference = AutoModelForCausalLM.from_pretrained(tiny_models["a"], torch_dtype=torch.float32)
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_target_missing_a_tensor_is_an_error(tiny_models) -> None:
    from merge_core.errors import ModelError

    plan = plan_merge(recipe_from_dict(_recipe(tiny_models, "linear", [0.5, 0.5, 0.0])))
    merger = InMemoryMerger(plan)
    target = merger.merged_state_dict(plan)
    target.pop("model.norm.weight")
    with pytest.raises(ModelError, match="model.norm.weight"):
        merger.merge_into(plan, target)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_streamed_inputs_equal_resident_inputs(method: str, tiny_models) -> None:
    """Inputs kept in CPU memory and copied per merge (GPU memory too small) merge identically."""
    planner = Planner()
    plans = [planner.plan(recipe_from_dict(_recipe(tiny_models, method, w, density=0.6)), seed=5)
             for w in ([0.5, 0.3, 0.2], [1.0, -0.4, 0.7])]
    resident = InMemoryMerger(plans[0], resident=True)
    streamed = InMemoryMerger(plans[0], resident=False)
    assert streamed.needed_bytes == resident.needed_bytes == resident.input_bytes > 0
    assert "streamed" in streamed.memory_report() and "resident" in resident.memory_report()
    for plan in plans:
        a, b = resident.merged_state_dict(plan), streamed.merged_state_dict(plan)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not streamed._inputs  # nothing cached per tensor when streaming


def test_freed_heap_is_returned_only_after_caches_are_built(tiny_models, monkeypatch) -> None:
    """Building caches (first candidate) hands freed heap pages back to the OS; later candidates
    that only reuse the caches do not pay for it."""
    import merge_core.in_memory as in_memory

    real = in_memory._return_freed_memory
    calls = []
    monkeypatch.setattr(in_memory, "_return_freed_memory", lambda: calls.append(1))
    planner = Planner()
    plan = planner.plan(recipe_from_dict(_recipe(tiny_models, "ties", [0.5, 0.5, 0.5], density=0.5)))
    merger = InMemoryMerger(plan)
    target = merger.merged_state_dict(plan)
    assert calls  # sorted keys were built
    calls.clear()
    merger.merge_into(planner.plan(recipe_from_dict(_recipe(tiny_models, "ties", [0.2, 0.9, 0.4], density=0.3))),
                      target)
    assert calls == []
    real()  # glibc here (elsewhere a no-op): must not raise


def _more_recipe(models: dict[str, Path], method: str, k: int) -> dict:
    """A recipe of the methods added after mergekit 0.1.5's first fourteen; ``k`` varies its parameters."""
    names = {"nearswap": ["a"], "arcee_fusion": ["b"]}.get(method, ["a", "b", "c"])
    entries = [{"model": str(models[n])} for n in names]
    if method == "multislerp":
        for i, e in enumerate(entries):
            e["parameters"] = {"weight": [0.2 + 0.3 * i, 0.9 - 0.2 * k]}
    recipe = {"merge_method": method, "models": entries, "dtype": "float32",
              "parameters": {"nearswap": {"t": [0.01, 0.05 * (k + 1)]}, "ramplus_tl": {"r": 0.3 * (k + 1), "alpha": 0.5},
                             "ram": {"epsilon": 0.02 * k}, "karcher": {"max_iter": 3 + 5 * k}}.get(method, {})}
    if method != "karcher":
        recipe["base_model"] = str(models["base"])
    return recipe


@pytest.mark.parametrize("method", ["multislerp", "karcher", "nearswap", "arcee_fusion", "ram", "ramplus_tl"])
def test_more_methods_in_memory_equal_streaming(method: str, tiny_models, tmp_path: Path) -> None:
    """One merger, two candidates (warm caches between them): each equals merge-yaml's output."""
    planner = Planner()
    plans = [planner.plan(recipe_from_dict(_more_recipe(tiny_models, method, k))) for k in (0, 1)]
    merger = InMemoryMerger(plans[0])
    target = merger.merged_state_dict(plans[0])
    for k, plan in enumerate(plans):
        merger.merge_into(plan, target)
        (tmp_path / str(k)).mkdir()
        expected = _streamed(_more_recipe(tiny_models, method, k), tmp_path / str(k))
        assert sorted(target) == sorted(expected)
        for name, tensor in expected.items():
            torch.testing.assert_close(target[name], tensor, rtol=0, atol=1e-6, msg=f"{k}: {name}")
