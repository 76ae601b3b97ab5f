"""Whole ``merge-yaml`` runs of multislerp, karcher, nearswap, arcee_fusion, ram and ramplus_tl
against ``mergekit-yaml`` 0.1.5, on tiny Llama checkpoints.

Every mergekit merge of this file runs in ONE oracle process (its import costs seconds): the
``oracle`` fixture writes all recipes first, then one subprocess calls mergekit's ``run_merge``
on each.  Float32 recipes must give mergekit's tensors (to float32 rounding); bf16 recipes
are checked against the README's Numerics rules and their counts printed (``pytest -s``).

The zoo: dense fine-tunes (``base + 0.1 * random``), one of them with tied embeddings (no
``lm_head``: its embeddings stand in, as in mergekit), and sparse fine-tunes that each change a
different random 40% of the elements (so RAM's "changed by one model / by several" both occur).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merge_core.cli import main as merge_yaml
from tiny_models import make_tiny_llama

pytestmark = [pytest.mark.mergekit, pytest.mark.slow]

ORACLE = r"""
import json, sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

jobs = json.load(open(sys.argv[1]))
status = []
for job in jobs:
    text = open(job["config"]).read()
    try:
        config = MergeConfiguration.model_validate(yaml.safe_load(text))
        run_merge(config, job["out"], options=MergeOptions(copy_tokenizer=False, write_model_card=False,
                                                           quiet=True), config_source=text)
        status.append("ok")
    except Exception as err:  # a refused recipe is a result too
        status.append(f"error: {type(err).__name__}: {err}")
json.dump(status, open(sys.argv[2], "w"))
"""


def _load(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """float32 and bf16 copies (``<name>`` and ``<name>_bf16``) of base, m1..m3 (m3 tied), s1..s3."""
    root = tmp_path_factory.mktemp("more_zoo")
    base = load_file(str(make_tiny_llama(root / "raw", seed=30) / "model.safetensors"))
    out: dict[str, Path] = {}
    gen = torch.Generator().manual_seed(5)
    for name, seed in (("base", None), ("m1", 31), ("m2", 32), ("m3", 33), ("s1", 34), ("s2", 35), ("s3", 36)):
        tied = name == "m3"
        own = load_file(str(make_tiny_llama(root / f"raw_{name}", seed=seed or 30) / "model.safetensors"))
        weights = {}
        for k, v in base.items():
            if seed is None:
                weights[k] = v
            elif name.startswith("s"):
                weights[k] = v + 0.1 * own[k] * (torch.rand(v.shape, generator=gen) < 0.4)
            else:
                weights[k] = v + 0.1 * own[k]
        if tied:
            del weights["lm_head.weight"]
        for suffix, dtype in (("", torch.float32), ("_bf16", torch.bfloat16)):
            path = make_tiny_llama(root / f"{name}{suffix}", seed=0, dtype=dtype, tie_word_embeddings=tied)
            save_file({k: v.to(dtype) for k, v in weights.items()}, str(path / "model.safetensors"),
                      metadata={"format": "pt"})
            out[f"{name}{suffix}"] = path
    return out


def _entry(zoo: dict[str, Path], name: str, params: dict | None, suffix: str) -> dict:
    entry: dict = {"model": str(zoo[name + suffix])}
    if params is not None:
        entry["parameters"] = params
    return entry


# name: (merge_method, base model or None, recipe parameters, [(model, its parameters)])
CASES: dict[str, tuple[str, str | None, dict, list[tuple[str, dict | None]]]] = {
    "multislerp_base": ("multislerp", "base", {},
                        [("m1", {"weight": 0.5}), ("m2", {"weight": 0.3}), ("m3", {"weight": 0.2})]),
    "multislerp_no_base_gradient": ("multislerp", None, {"normalize_weights": False},
                                    [("m1", {"weight": [0.2, 0.8]}),
                                     ("m2", {"weight": [{"filter": "mlp", "value": 0.7}, {"value": 0.4}]})]),
    "karcher": ("karcher", None, {}, [("m1", None), ("m2", None), ("m3", None)]),
    "karcher_with_base": ("karcher", "base", {"max_iter": 3, "tol": 1e-4}, [("m1", None), ("m2", None)]),
    "nearswap": ("nearswap", "base", {"t": 0.004}, [("m1", None)]),
    "nearswap_gradient": ("nearswap", "m2", {"t": [0.0005, 0.01]}, [("m1", None), ("m2", None)]),
    "arcee_fusion": ("arcee_fusion", "base", {}, [("m2", None)]),
    "ram": ("ram", "base", {}, [("s1", None), ("s2", None), ("s3", None)]),
    "ram_epsilon": ("ram", "base", {"epsilon": 0.003}, [("m1", None), ("s2", None)]),
    "ramplus_tl": ("ramplus_tl", "base", {}, [("s1", None), ("s2", None), ("s3", None)]),
    "ramplus_tl_params": ("ramplus_tl", "base", {"r": 0.8, "alpha": 1.5, "epsilon": 1e-3},
                          [("s1", None), ("s2", None), ("m3", None)]),
}
# Recipes both tools refuse (mergekit's input contract; ours says so in one line).
REFUSED: dict[str, tuple[str, str | None, dict, list[tuple[str, dict | None]]]] = {
    "nearswap_two_models": ("nearswap", "base", {"t": 0.01}, [("m1", None), ("m2", None)]),
    "arcee_fusion_no_base": ("arcee_fusion", None, {}, [("m1", None), ("m2", None)]),
}
BF16 = ["multislerp_base", "karcher", "nearswap", "arcee_fusion", "ram", "ramplus_tl"]
# The share of elements where ours and mergekit's float32 computation, each rounded once to bf16,
# may differ by 1 ulp (another operation order in float32); 0: bit for bit (README, Numerics).
MERGEKIT_WRITES_FLOAT32 = {"arcee_fusion", "ramplus_tl"}  # with dtype: bfloat16 and no out_dtype
# multislerp and karcher run their geometry in float64 on the Gram matrix, then one linear combination.
BF16_ONE_ULP = {"multislerp_base": 0.01, "karcher": 0.01, "nearswap": 0.0, "arcee_fusion": 0.0, "ram": 0.0,
                "ramplus_tl": 0.0}
# merge-evolve's exported recipes (Genome.decode of a random point in the box): mergekit-yaml must
# accept them and give our tensors (della_linear's random drops differ: accepted is checked).
GENOMES: dict[str, tuple[dict, list[str]]] = {
    "breadcrumbs_ties": ({"layer_granularity": 2, "filters": ["mlp"]}, ["m1", "m2"]),
    "della_linear": ({"smooth": True, "layer_granularity": 2}, ["m1", "m2"]),
    "multislerp": ({"layer_granularity": 2}, ["m1", "m2", "m3"]),
    "nuslerp": ({"smooth": True, "layer_granularity": 1}, ["m1", "m2"]),
    "sce": ({"layer_granularity": 2, "filters": ["self_attn"]}, ["s1", "s2", "s3"]),
    "nearswap": ({"layer_granularity": 1}, ["m1"]),
    "ram": ({"smooth": True, "layer_granularity": 2}, ["s1", "s2"]),
    "ramplus_tl": ({"layer_granularity": 2, "filters": ["mlp"]}, ["s1", "s2", "s3"]),
}


def _genome_recipe(zoo, method: str) -> dict:
    import numpy as np

    from evolve.config import parse_evolve_config
    from evolve.genome import Genome

    layout, models = GENOMES[method]
    genome = {"models": [str(zoo[m]) for m in models], "merge_method": method, "base_model": str(zoo["base"]),
              **layout}
    g = Genome(parse_evolve_config({"genome": genome, "tasks": ["t"]}).genome, 4, dtype="float32")
    lo, hi = (np.asarray(b) for b in g.bounds)
    return g.decode(np.random.default_rng(len(method)).uniform(lo, hi))


def _recipe(zoo, case, suffix: str = "", dtype: str = "float32", out_dtype: str | None = None) -> dict:
    method, base, glob, models = case
    recipe: dict = {"merge_method": method, "dtype": dtype,
                    "models": [_entry(zoo, m, p, suffix) for m, p in models]}
    if base is not None:
        recipe["base_model"] = str(zoo[base + suffix])
    if glob:
        recipe["parameters"] = glob
    if out_dtype:
        recipe["out_dtype"] = out_dtype
    return recipe


@pytest.fixture(scope="module")
def oracle(zoo, tmp_path_factory, mergekit_py: str) -> dict[str, object]:
    """mergekit's output directory (or refusal) per job name, from one subprocess."""
    root = tmp_path_factory.mktemp("more_oracle")
    recipes = {name: _recipe(zoo, case) for name, case in {**CASES, **REFUSED}.items()}
    for name in BF16:
        recipes[f"{name}:bf16"] = _recipe(zoo, CASES[name], "_bf16", "bfloat16")
        recipes[f"{name}:f32"] = _recipe(zoo, CASES[name], "_bf16", "float32", "bfloat16")
    for method in GENOMES:
        recipes[f"genome:{method}"] = _genome_recipe(zoo, method)
    jobs = []
    for k, (name, recipe) in enumerate(recipes.items()):
        config = root / f"job{k}.yml"
        config.write_text(yaml.safe_dump(recipe, sort_keys=False))
        jobs.append({"name": name, "config": str(config), "out": str(root / f"out{k}")})
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([mergekit_py, "-c", ORACLE, str(root / "jobs.json"), str(root / "status.json")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads((root / "status.json").read_text())
    return {job["name"]: (Path(job["out"]) if s == "ok" else s) for job, s in zip(jobs, status)}


def _ours(recipe: dict, tmp_path: Path, name: str = "ours") -> tuple[int, Path]:
    config = tmp_path / f"{name}.yml"
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return merge_yaml([str(config), str(tmp_path / name), "--quiet"]), tmp_path / name


def _assert_same(ours: dict, theirs: dict, case: str, rel: float = 4e-6) -> None:
    assert sorted(ours) == sorted(theirs)
    worst = 0.0
    for name, expected in theirs.items():
        got = ours[name]
        assert got.shape == expected.shape and got.dtype == expected.dtype == torch.float32, name
        diff = (got - expected).abs()
        assert not (diff > rel * expected.abs().clamp_min(1e-2) + 1e-7).any(), (
            f"{case}: {name}: max abs diff {diff.max().item():.3g}")
        worst = max(worst, diff.max().item())
    print(f"[vs mergekit] {case}: max abs diff {worst:.3g} over {len(theirs)} tensors")


@pytest.mark.parametrize("case", list(CASES))
def test_float32_matches_mergekit(case: str, zoo, oracle, tmp_path: Path) -> None:
    theirs_dir = oracle[case]
    assert isinstance(theirs_dir, Path), theirs_dir
    code, ours_dir = _ours(_recipe(zoo, CASES[case]), tmp_path)
    assert code == 0
    _assert_same(_load(ours_dir), _load(theirs_dir), case)


@pytest.mark.parametrize("method", list(GENOMES))
def test_exported_genome_recipes_are_mergekit_recipes(method: str, zoo, oracle, tmp_path: Path) -> None:
    theirs_dir = oracle[f"genome:{method}"]
    assert isinstance(theirs_dir, Path), theirs_dir  # mergekit-yaml accepted and merged it
    code, ours_dir = _ours(_genome_recipe(zoo, method), tmp_path)
    assert code == 0
    if method != "della_linear":
        _assert_same(_load(ours_dir), _load(theirs_dir), f"genome {method}")


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_like_mergekit(case: str, zoo, oracle, tmp_path: Path, capsys) -> None:
    assert isinstance(oracle[case], str) and oracle[case].startswith("error"), oracle[case]
    code, out = _ours(_recipe(zoo, REFUSED[case]), tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert len(err) == 1 and REFUSED[case][0] in err[0], err


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns as integers in value order: adjacent bf16 numbers differ by 1."""
    bits = x.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


@pytest.mark.parametrize("case", BF16)
def test_bf16_is_mergekit_float32_rounded_once(case: str, zoo, oracle, tmp_path: Path) -> None:
    """README Numerics, per method: with ``dtype: bfloat16`` ours is mergekit's float32 computation of
    the bf16 inputs rounded once (``dtype: float32, out_dtype: bfloat16``), bit for bit or within the
    stated 1-ulp share; against mergekit's own bf16 computation the differences are counted."""
    code, ours_dir = _ours(_recipe(zoo, CASES[case], "_bf16", "bfloat16"), tmp_path)
    assert code == 0
    exact, theirs = oracle[f"{case}:f32"], oracle[f"{case}:bf16"]
    assert isinstance(exact, Path) and isinstance(theirs, Path), (exact, theirs)
    ours, exact, theirs = _load(ours_dir), _load(exact), _load(theirs)
    assert sorted(ours) == sorted(exact) == sorted(theirs)
    n = off1 = over1 = bf_differ = bf_over1 = 0
    worst = 0.0
    for name, got in ours.items():
        assert got.dtype == exact[name].dtype == torch.bfloat16, name
        # mergekit 0.1.5 writes these two as float32 (a float32 mask / scale promotes its bf16 result)
        assert theirs[name].dtype == (torch.float32 if case in MERGEKIT_WRITES_FLOAT32 else torch.bfloat16), name
        theirs[name] = theirs[name].to(torch.bfloat16)
        ulps = (_ordered(got) - _ordered(exact[name])).abs()
        n += got.numel()
        off1 += int((ulps == 1).sum())
        over1 += int((ulps > 1).sum())
        vs = (_ordered(got) - _ordered(theirs[name])).abs()
        bf_differ += int((vs > 0).sum())
        bf_over1 += int((vs > 1).sum())
        worst = max(worst, float((got.float() - theirs[name].float()).abs().max()))
    print(f"[bf16 vs mergekit] {case}: {n} elements; vs mergekit float32 -> bf16: {off1} by 1 ulp, {over1} by more; "
          f"vs mergekit bf16: {bf_differ} differ ({bf_differ / n:.1%}), {bf_over1} by > 1 ulp, max abs {worst:.3g}")
    assert over1 == 0
    assert off1 <= BF16_ONE_ULP[case] * n
