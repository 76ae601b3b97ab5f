
"""Differential tests per family: ``merge-yaml`` against ``mergekit-yaml`` 0.1.5 on tiny random
float32 checkpoints of every family the installed transformers builds (tests/family_models.py).

One mergekit process merges every (family, recipe) pair (its import costs seconds); each family's
test merges the same recipes with ours, compares every tensor, and loads each output with
transformers and runs it.  Randomized methods (DARE, DELLA) draw other random numbers than
mergekit's: their tensors' names and shapes are compared, and their values checked finite.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from family_models import FAMILIES, MERGEKIT_ORACLE, build_family, load_and_run

from merge_core.cli import main as merge_yaml
from tiny_models import load_checkpoint_tensors

pytestmark = [pytest.mark.mergekit, pytest.mark.slow]




def _recipes(m: dict[str, str]) -> dict[str, dict]:
    """Every recipe of a family's test, over its models ``m`` (base, m1..m3: paths)."""
    def entries(*pairs):
        return [{"model": m[name], **({"parameters": p} if p else {})} for name, p in pairs]

    return {
        "linear": {"merge_method": "linear",
                   "models": entries(("m1", {"weight": 0.5}), ("m2", {"weight": 0.3}), ("m3", {"weight": 0.2}))},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": m["base"],
                            "models": entries(("base", None), ("m1", {"weight": 0.6}), ("m2", {"weight": -0.3}),
                                              ("m3", {"weight": 1.0}))},
        "ties": {"merge_method": "ties", "base_model": m["base"], "parameters": {"normalize": True},
                 "models": entries(("m1", {"weight": 0.5, "density": 0.5}), ("m2", {"weight": 0.3, "density": 0.7}),
                                   ("m3", {"weight": 0.4, "density": 0.3}))},
        "slerp": {"merge_method": "slerp", "base_model": m["m1"],
                  "parameters": {"t": [{"filter": "attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                       {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
                  "models": entries(("m1", None), ("m2", None))},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": m["base"],
                             "models": entries(("m1", {"weight": 0.5, "density": 0.8, "gamma": 0.05}),
                                               ("m2", {"weight": 0.7, "density": 0.6, "gamma": 0.02}))},
        "model_stock": {"merge_method": "model_stock", "base_model": m["base"],
                        "models": entries(("m1", None), ("m2", None), ("m3", None))},
        "passthrough_deeper": {"merge_method": "passthrough",
                               "slices": [{"sources": [{"model": m["m1"], "layer_range": [0, 3]}]},
                                          {"sources": [{"model": m["m2"], "layer_range": [1, 4]}]}]},
        "passthrough_shallower": {"merge_method": "passthrough",
                                  "slices": [{"sources": [{"model": m["m3"], "layer_range": [1, 3]}]}]},
        "dare_ties": {"merge_method": "dare_ties", "base_model": m["base"],
                      "models": entries(("m1", {"weight": 0.6, "density": 0.5}), ("m2", {"weight": 0.4, "density": 0.7}))},
        "della": {"merge_method": "della", "base_model": m["base"],
                  "models": entries(("m1", {"weight": 0.6, "density": 0.5, "epsilon": 0.1}),
                                    ("m2", {"weight": 0.4, "density": 0.7, "epsilon": 0.1}))},
    }


RANDOMIZED = ("dare_ties", "della")
# Where mergekit 0.1.5 cannot merge: the same recipe is checked without it.
MERGEKIT_FAILS = {
    # it copies config.json's layer_types unchanged, and transformers then refuses its config
    "passthrough": "must be equal to the number of `layer_types`",
    # its DELLA computes keep probabilities outside [0, 1] on Apertus's one-element xIELU tensors
    "apertus__della": "Expected p_in >= 0 && p_in <= 1",
    # its planner finds no input for the first layer of a stack of MoE layers of GLM-4-MoE (whose
    # config says its first layer is dense)
    "glm4_moe__passthrough_shallower": "requires at least 1 inputs",
}
PASSTHROUGH_SOURCES = {  # output layer -> (model, layer); pre tensors from the first, post from the last
    "passthrough_deeper": [("m1", 0), ("m1", 1), ("m1", 2), ("m2", 1), ("m2", 2), ("m2", 3)],
    "passthrough_shallower": [("m3", 1), ("m3", 2)],
}


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory: pytest.TempPathFactory, mergekit_py: str) -> Path:
    """Every family's models and recipes, merged by mergekit in one process."""
    root = tmp_path_factory.mktemp("families")
    (root / "recipes").mkdir()
    cases = []
    for family in FAMILIES:
        models = {k: str(v) for k, v in build_family(family, root / "models").items()}
        for case, recipe in _recipes(models).items():
            recipe = {**recipe, "dtype": "float32"}
            (root / "recipes" / f"{family}__{case}.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
            cases.append(f"{family}__{case}")
    (root / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run([mergekit_py, "-c", MERGEKIT_ORACLE, str(root)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors as the models hold them (MoE experts fused, as merges write them)."""
    from merge_core.tensor_io import CheckpointReader

    with CheckpointReader(path) as reader:
        return {name: reader.read(name) for name in reader.names()}


def _merge_ours(root: Path, case: str) -> Path:
    out = root / "ours" / case
    assert merge_yaml([str(root / "recipes" / f"{case}.yml"), str(out), "--quiet"]) == 0, case
    return out


def _mergekit_failed(status: dict[str, str], key: str) -> bool:
    """Whether mergekit failed on ``key`` for a known reason (MERGEKIT_FAILS); asserts it merged otherwise."""
    if status[key] == "ok":
        return False
    reasons = [why for what, why in MERGEKIT_FAILS.items() if what in key]
    assert reasons and any(why in status[key] for why in reasons), f"mergekit failed on {key}: {status[key]}"
    return True


def _check_passthrough(ours: dict[str, torch.Tensor], models: Path, case: str) -> None:
    """A passthrough stack is its sources' tensors, renumbered: checked against the inputs."""
    from merge_core.architecture import architecture_for
    from merge_core.model_ref import load_model_info

    plan = PASSTHROUGH_SOURCES[case]
    inputs = {name: _read_all(models / name) for name in {m for m, _ in plan}}
    arch = architecture_for(json.loads((models / plan[0][0] / "config.json").read_text()), case,
                            load_model_info(case, models / plan[0][0]).tensors)
    expected = {}
    for out, (model, layer) in enumerate(plan):
        for suffix in arch.layers[layer]:
            expected[f"{arch.layer_prefix}{out}.{suffix}"] = inputs[model][f"{arch.layer_prefix}{layer}.{suffix}"]
    for spec in arch.pre:
        expected[spec.name] = inputs[plan[0][0]][spec.name]
    for spec in arch.post + ((arch.head_spec(),) if arch.head else ()):
        expected[spec.name] = inputs[plan[-1][0]][spec.name]
    assert sorted(ours) == sorted(expected), case
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), f"{case}: {name}"


def _compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], case: str, values: bool) -> float:
    assert sorted(ours) == sorted(theirs), (f"{case}: only ours {sorted(set(ours) - set(theirs))[:4]}, "
                                            f"only mergekit's {sorted(set(theirs) - set(ours))[:4]}")
    worst = 0.0
    for name, expected in theirs.items():
        got = ours[name]
        assert got.shape == expected.shape and got.dtype == expected.dtype, f"{case}: {name}"
        assert torch.isfinite(got).all(), f"{case}: {name} not finite"
        if values:
            diff = (got - expected).abs().max().item()
            assert diff <= 2e-3, f"{case}: {name} max abs diff {diff:.3g}"
            worst = max(worst, diff)
    return worst


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_merges_match_mergekit_and_load(family: str, family_runs: Path) -> None:
    status = json.loads((family_runs / "status.json").read_text())
    worst = 0.0
    inferred = status[f"{family}__inferred"] == "yes"
    for case in _recipes({k: "" for k in ("base", "m1", "m2", "m3")}):
        key = f"{family}__{case}"
        failed = _mergekit_failed(status, key)
        ours = _merge_ours(family_runs, key)
        got = load_checkpoint_tensors(ours)
        if case in PASSTHROUGH_SOURCES:
            _check_passthrough(got, family_runs / "models" / family, case)
        if not failed:
            theirs = load_checkpoint_tensors(family_runs / "mergekit" / key)
            if inferred and case in PASSTHROUGH_SOURCES:
                # mergekit's inferred layouts take every tensor outside the layers from the first
                # slice; ours takes the final norm and head from the last (checked above), as its
                # definitions of known families do.
                got = {k: v for k, v in got.items() if ".layers." in k or "embed" in k}
                theirs = {k: v for k, v in theirs.items() if ".layers." in k or "embed" in k}
            worst = max(worst, _compare(got, theirs, key, case not in RANDOMIZED))
        load_and_run(ours)
        config = json.loads((ours / "config.json").read_text())
        depth = {"passthrough_deeper": 6, "passthrough_shallower": 2}.get(case, 4)
        layer_count = config.get("num_hidden_layers", config.get("n_layer"))
        assert layer_count == depth, key
        for key_name, value in config.items():  # every per-layer list follows the written layers
            if key_name in ("layer_types", "no_rope_layers"):
                assert len(value) == depth, (key, key_name)
    print(f"[families vs mergekit] {family}: max abs diff {worst:.3g}")
