
"""Differential tests: our ``merge-yaml`` against ``mergekit-yaml`` 0.1.5 on tiny Llama checkpoints.

mergekit runs as a subprocess from its own venv (a test-only oracle; the product never imports
it).  Each case writes one recipe, merges it with both tools and compares every tensor.  The
largest absolute difference of each case is printed (``pytest -s`` shows them) so drift is
visible even when within tolerance.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from merge_core.cli import main as merge_yaml
from tiny_models import load_checkpoint_tensors, make_tiny_llama

pytestmark = [pytest.mark.mergekit, pytest.mark.slow]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Base + three fine-tune-like models: base plus small random deltas, so task vectors are small
    and sign elections are non-trivial (as with real fine-tunes), 6 layers for slice tests."""
    root = tmp_path_factory.mktemp("mk_zoo")
    return {
        name: make_tiny_llama(root / name, seed=seed, num_hidden_layers=6)
        for name, seed in (("base", 10), ("m1", 11), ("m2", 12), ("m3", 13))
    }


@pytest.fixture(scope="module")
def ft_zoo(zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """m1..m3 rewritten as base + 0.1 * (their random weights), like real fine-tunes."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("mk_ft")
    base = load_file(str(zoo["base"] / "model.safetensors"))
    out = {"base": zoo["base"]}
    for name in ("m1", "m2", "m3"):
        target = make_tiny_llama(root / name, seed=0, num_hidden_layers=6)
        own = load_file(str(zoo[name] / "model.safetensors"))
        save_file({k: base[k] + 0.1 * own[k] for k in base}, str(target / "model.safetensors"),
                  metadata={"format": "pt"})
        out[name] = target
    return out


def _merge_both(recipe: dict, tmp: Path, mergekit_py: str) -> tuple[dict, dict]:
    config = tmp / "recipe.yml"
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    ours, theirs = tmp / "ours", tmp / "theirs"
    assert merge_yaml([str(config), str(ours), "--quiet"]) == 0
    mergekit_yaml = str(Path(mergekit_py).parent / "mergekit-yaml")
    proc = subprocess.run([mergekit_yaml, str(config), str(theirs)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return load_checkpoint_tensors(ours), load_checkpoint_tensors(theirs)


def _assert_same(ours: dict, theirs: dict, case: str, dtype: str) -> None:
    assert sorted(ours) == sorted(theirs), f"{case}: tensor names differ"
    worst = 0.0
    for name, expected in theirs.items():
        got = ours[name]
        assert got.shape == expected.shape, f"{case}: {name} shape"
        assert got.dtype == expected.dtype, f"{case}: {name} dtype {got.dtype} != {expected.dtype}"
        diff = (got.float() - expected.float()).abs()
        # Within rounding of the recipe's dtype: one ulp of the larger magnitude.
        eps = {"float32": 2e-6, "bfloat16": 2**-7, "float16": 2**-10}[dtype]
        scale = expected.float().abs().clamp_min(1e-2)
        bad = diff > eps * scale * 2 + 1e-6
        assert not bad.any(), f"{case}: {name} max abs diff {diff.max().item():.3g}"
        worst = max(worst, diff.max().item())
    print(f"[vs mergekit] {case}: max abs diff {worst:.3g} over {len(theirs)} tensors")


def _models(zoo: dict[str, Path], names: list[str], params: list[dict | None]) -> list[dict]:
    entries = []
    for name, p in zip(names, params):
        entry: dict = {"model": str(zoo[name])}
        if p is not None:
            entry["parameters"] = p
        entries.append(entry)
    return entries


CASES: dict[str, dict] = {
    "linear": {"merge_method": "linear",
               "models": [("m1", {"weight": 0.5}), ("m2", {"weight": 0.3}), ("m3", {"weight": 0.2})]},
    "linear_unnormalized": {"merge_method": "linear", "parameters": {"normalize": False},
                            "models": [("m1", {"weight": 0.7}), ("m2", {"weight": 0.6})]},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base",
                        "models": [("base", None), ("m1", {"weight": 0.6}), ("m2", {"weight": -0.3}),
                                   ("m3", {"weight": 1.0})]},
    "ties": {"merge_method": "ties", "base_model": "base",
             "parameters": {"normalize": True, "int8_mask": True},
             "models": [("m1", {"weight": 0.5, "density": 0.5}), ("m2", {"weight": 0.3, "density": 0.7}),
                        ("m3", {"weight": 0.4, "density": 0.3})]},
    "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": "base",
                    "models": [("m1", {"weight": 0.5, "density": 0.8, "gamma": 0.05}),
                               ("m2", {"weight": 0.5, "density": 0.6, "gamma": 0.02})]},
    "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": "base",
                         "models": [("m1", {"weight": 0.5, "density": 0.8, "gamma": 0.05}),
                                    ("m2", {"weight": 0.7, "density": 0.6, "gamma": 0.02})]},
    "slerp_gradient_filters": {
        "merge_method": "slerp", "base_model": "m1",
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
        "models": [("m1", None), ("m2", None)]},
    "nuslerp": {"merge_method": "nuslerp", "base_model": "base",
                "models": [("m1", {"weight": 0.4}), ("m2", {"weight": 0.6})]},
    "nuslerp_no_base": {"merge_method": "nuslerp",
                        "models": [("m1", {"weight": 0.3}), ("m2", {"weight": 0.7})]},
    "model_stock": {"merge_method": "model_stock", "base_model": "base",
                    "models": [("m1", None), ("m2", None), ("m3", None)]},
    "sce": {"merge_method": "sce", "base_model": "base", "parameters": {"select_topk": 0.5},
            "models": [("m1", None), ("m2", None), ("m3", None)]},
    "ties_filter_gradient_out_dtype": {
        "merge_method": "ties", "base_model": "base", "out_dtype": "bfloat16",
        "models": [("m1", {"density": [0.2, 0.9], "weight": [{"filter": "mlp", "value": [0.1, 1.0]},
                                                             {"value": 0.5}]}),
                   ("m2", {"density": 0.5, "weight": 0.5})]},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_models_form_matches_mergekit(case: str, ft_zoo, tmp_path: Path, mergekit_py: str) -> None:
    spec = CASES[case]
    models = ft_zoo
    names = [n for n, _ in spec["models"]]
    recipe = {"merge_method": spec["merge_method"], "dtype": "float32",
              "models": _models(models, names, [p for _, p in spec["models"]])}
    if "base_model" in spec:
        recipe["base_model"] = str(models[spec["base_model"]])
    for key in ("parameters", "out_dtype"):
        if key in spec:
            recipe[key] = spec[key]
    ours, theirs = _merge_both(recipe, tmp_path, mergekit_py)
    _assert_same(ours, theirs, case, recipe.get("out_dtype", "float32"))


def test_slices_layer_ranges_match_mergekit(ft_zoo, tmp_path: Path, mergekit_py: str) -> None:
    """Two slerp slices with layer ranges: a gradient over the first, a slice-level t on the second."""
    models = ft_zoo
    m1, m2 = str(models["m1"]), str(models["m2"])
    recipe = {
        "merge_method": "slerp", "base_model": m1, "dtype": "float32",
        "parameters": {"t": [0.0, 1.0]},
        "slices": [
            {"sources": [{"model": m1, "layer_range": [0, 3]}, {"model": m2, "layer_range": [0, 3]}]},
            {"sources": [{"model": m1, "layer_range": [3, 6]}, {"model": m2, "layer_range": [3, 6]}],
             "parameters": {"t": 0.25}},
        ],
    }
    ours, theirs = _merge_both(recipe, tmp_path, mergekit_py)
    _assert_same(ours, theirs, "slerp_slices", "float32")


def test_passthrough_frankenmerge_matches_mergekit(zoo, tmp_path: Path, mergekit_py: str) -> None:
    m1, m2 = str(zoo["m1"]), str(zoo["m2"])
    recipe = {
        "merge_method": "passthrough", "dtype": "bfloat16",
        "slices": [{"sources": [{"model": m1, "layer_range": [0, 4]}]},
                   {"sources": [{"model": m2, "layer_range": [2, 6]}]}],
    }
    ours, theirs = _merge_both(recipe, tmp_path, mergekit_py)
    _assert_same(ours, theirs, "passthrough_slices", "bfloat16")
    config = yaml.safe_load((tmp_path / "ours" / "config.json").read_text())
    assert config["num_hidden_layers"] == 8
