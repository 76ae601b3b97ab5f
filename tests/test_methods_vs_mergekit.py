"""Differential test: our deterministic methods against mergekit 0.1.5's own merge functions.

mergekit runs in its own venv (``MERGEKIT_PYTHON``, else ``/work/mkvenv/bin/python``, else the
checkout's ``.venv-mergekit``; skipped when none exists unless ``REQUIRE_MERGEKIT=1``); one subprocess merges every case from saved tensors.  Inputs are
float32 (mergekit computes task vectors in the input dtype, so bf16 inputs would compare its
bf16 rounding, not the method); a few bf16 cases check the methods that mergekit runs in float32.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import mergekit_python

from merge_core.methods import get_method
from merge_core.methods.base import TensorInputs, TensorParams

pytestmark = pytest.mark.mergekit

ORACLE = r"""
import json, sys, torch
from mergekit import merge_methods
from mergekit.merge_methods.base import TensorGroup

root = sys.argv[1]
cases = json.load(open(f"{root}/cases.json"))
for k, case in enumerate(cases):
    tensors = torch.load(f"{root}/in_{k}.pt")
    group = TensorGroup.from_tensors(tensors, base_index=case["base"], name="w")
    method = merge_methods.get(case["method"])
    params = dict(case["global"])
    for name, values in case["per_model"].items():
        params[name] = values
    (result,) = method([group], parameters=params)
    torch.save(result.contiguous(), f"{root}/out_{k}.pt")
"""


def _mergekit_python() -> str | None:
    """``MERGEKIT_PYTHON``, else /work/mkvenv, else conftest's default (which honours REQUIRE_MERGEKIT)."""
    if not os.environ.get("MERGEKIT_PYTHON") and Path("/work/mkvenv/bin/python").exists():
        return "/work/mkvenv/bin/python"
    return mergekit_python()


def _case(method, n=3, base=0, glob=None, per=None, shape=(48, 40), dtype="float32", seed=0, spread=0.1,
          quant=None):
    """``per`` maps a per-model parameter to its values for the models that take it (mergekit's order).

    ``quant`` rounds the task vectors to multiples of it: many magnitudes tie at the thresholds.
    """
    return dict(method=method, n=n, base=base, glob=glob or {}, per=per or {}, shape=list(shape),
                dtype=dtype, seed=seed, spread=spread, quant=quant)


CASES = [
    _case("linear", base=None, per={"weight": [0.2, 0.5, 0.3]}),
    _case("linear", base=None, glob={"normalize": False}, per={"weight": [1.0, -0.5, 0.0]}),
    _case("linear", base=None, per={"weight": [0.6, 0.7]}, n=2, dtype="bfloat16"),
    _case("slerp", n=2, base=0, glob={"t": 0.3}),
    _case("slerp", n=2, base=1, glob={"t": 0.8}, shape=(100,)),
    _case("slerp", n=2, base=0, glob={"t": 0.4}, spread=0.01),  # nearly collinear: linear branch
    _case("slerp", n=2, base=1, glob={"t": 0.25}, dtype="bfloat16"),
    _case("nuslerp", n=2, base=None, per={"weight": [0.3, 0.7]}),
    _case("nuslerp", n=3, base=1, per={"weight": [1.0, 3.0]}),
    _case("nuslerp", n=3, base=0, glob={"nuslerp_flatten": False}, per={"weight": [0.5, 0.5]}),
    _case("nuslerp", n=2, base=None, glob={"nuslerp_flatten": False, "nuslerp_row_wise": True},
          per={"weight": [0.2, 0.6]}),
    _case("task_arithmetic", n=4, per={"weight": [0.5, 0.3, -0.2]}),
    _case("task_arithmetic", n=3, base=2, glob={"normalize": True, "lambda": 1.5}, per={"weight": [0.5, 0.25]}),
    _case("ties", n=4, per={"weight": [0.5, 0.3, 0.4], "density": [0.3, 0.5, 0.9]}),
    _case("ties", n=4, base=1, glob={"normalize": False, "lambda": 0.7},
          per={"weight": [1.0, -0.6, 0.4], "density": [0.2, 1.0, 0.6]}),
    _case("ties", n=3, glob={"rescale": True}, per={"weight": [0.7, 0.3], "density": [0.4, 0.1]}, shape=(333,)),
    _case("ties", n=3, per={"weight": [1.0, 0.0], "density": [0.5, 0.5]}),
    _case("breadcrumbs", n=4, per={"weight": [0.5, 0.3, 0.4], "density": [0.5, 0.8, 0.3],
                                   "gamma": [0.05, 0.01, 0.2]}),
    _case("breadcrumbs", n=3, glob={"rescale": True, "normalize": True},
          per={"weight": [0.5, 0.8], "density": [0.6, 0.9], "gamma": [0.1, 0.0]}),
    _case("breadcrumbs", n=3, glob={"lambda": 0.6}, per={"weight": [0.5, 0.8], "density": [0.6, 0.9],
                                                     "gamma": [0.1, 0.0]}),
    _case("breadcrumbs_ties", n=4, base=3, per={"weight": [0.5, 0.3, 0.4], "density": [0.5, 0.7, 0.9],
                                                "gamma": [0.02, 0.05, 0.5]}),
    # Ties at the magnitude thresholds: mergekit's unstable sort keeps an arbitrary subset of the
    # elements equal to a threshold, ours the first ones in index order (compared off those).
    _case("ties", n=3, per={"weight": [0.6, 0.4], "density": [0.37, 0.55]}, shape=(300, 200), quant=0.05),
    _case("breadcrumbs_ties", n=3, per={"weight": [0.6, 0.4], "density": [0.37, 0.55], "gamma": [0.03, 0.1]},
          shape=(300, 200), quant=0.05),
    _case("breadcrumbs", n=3, glob={"rescale": True},
          per={"weight": [0.6, 0.4], "density": [0.5, 0.3], "gamma": [0.05, 0.2]}, shape=(5000,), quant=0.1),
    _case("model_stock", n=4),
    _case("model_stock", n=3, base=2, glob={"filter_wise": True}),
    _case("model_stock", n=4, glob={"filter_wise": True}, shape=(77,)),
    _case("sce", n=4),
    _case("sce", n=4, base=2, glob={"select_topk": 0.4}),
    _case("passthrough", n=1, base=None, per={"scale": [2.5]}),
    _case("passthrough", n=1, base=None),
    _case("multislerp", n=3, base=None, per={"weight": [0.2, 0.5, 0.3]}),
    _case("multislerp", n=4, base=0, per={"weight": [1.0, 2.0, 0.5]}),
    _case("multislerp", n=3, base=None, glob={"normalize_weights": False}, per={"weight": [0.4, 0.4, 0.4]}),
    _case("multislerp", n=3, base=2, glob={"eps": 1e-4}, per={"weight": [0.7, 0.1]}, shape=(100,)),
    _case("multislerp", n=2, base=1, per={"weight": [0.3]}),  # one model besides the base: itself
    _case("karcher", n=3, base=None),
    _case("karcher", n=4, base=0, spread=0.5),
    _case("karcher", n=3, base=None, glob={"max_iter": 2, "tol": 1e-3}, spread=1.0, shape=(77,)),
    _case("nearswap", n=2, base=0, glob={"t": 0.05}),
    _case("nearswap", n=2, base=1, glob={"t": 0.0005}, shape=(300,)),
    _case("nearswap", n=2, base=0, glob={"t": -0.1}),
    _case("arcee_fusion", n=2, base=0, shape=(64, 100)),
    _case("arcee_fusion", n=2, base=1, shape=(333,), spread=0.5),
    _case("ram", n=4, base=0, spread=0.1, quant=0.1),
    _case("ram", n=3, base=1, glob={"epsilon": 0.1}, spread=0.1, quant=0.05),
    _case("ram", n=1, base=0),  # the base alone
    _case("ramplus_tl", n=4, base=0, spread=0.1, quant=0.1),
    _case("ramplus_tl", n=4, base=3, glob={"r": 0.5, "alpha": 0.9, "epsilon": 0.06}, spread=0.1, quant=0.05),
    _case("ramplus_tl", n=3, base=0, glob={"r": 2.0, "alpha": 5.0}, spread=0.1, quant=0.2, shape=(999,)),
]


def _inputs(case) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(case["seed"])
    base = torch.randn(case["shape"], generator=gen)
    deltas = [case["spread"] * torch.randn(case["shape"], generator=gen) for _ in range(case["n"])]
    if case["quant"]:
        deltas = [(d / case["quant"]).round() * case["quant"] for d in deltas]
    tensors = [base + d for d in deltas]
    if case["base"] is not None:
        tensors[case["base"]] = base
    return [t.to(getattr(torch, case["dtype"])) for t in tensors]


def _ours(case, tensors) -> torch.Tensor:
    method = get_method(case["method"])
    base = case["base"] if method.base_rule != "ignored" else None
    takers = [i for i in range(len(tensors)) if i != base]
    per_model = [{} for _ in tensors]
    for name, values in case["per"].items():
        for i, v in zip(takers, values):
            per_model[i][name] = v
    return method.merge(TensorInputs("w", tensors, base), TensorParams(case["glob"], per_model))


@pytest.fixture(scope="module")
def oracle_results(tmp_path_factory):
    python = _mergekit_python()
    if python is None:
        pytest.skip("mergekit 0.1.5 venv not found (set MERGEKIT_PYTHON)")
    root = tmp_path_factory.mktemp("mk_methods")
    cases = []
    for k, case in enumerate(CASES):
        torch.save(_inputs(case), root / f"in_{k}.pt")
        cases.append({"method": case["method"], "base": case["base"], "global": case["glob"],
                      "per_model": case["per"]})
    (root / "cases.json").write_text(json.dumps(cases))
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([python, "-c", ORACLE, str(root)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(root / f"out_{k}.pt") for k in range(len(CASES))]


@pytest.mark.parametrize("k", range(len(CASES)),
                         ids=[f"{c['method']}-{k}" for k, c in enumerate(CASES)])
@pytest.mark.parametrize("chunk", [1 << 17, 517], ids=["chunk-default", "chunk-517"])
def test_matches_mergekit(k, chunk, oracle_results, monkeypatch):
    monkeypatch.setattr("merge_core.kernels.chunking.CPU_CHUNK", chunk)  # many chunk boundaries
    case = CASES[k]
    tensors = _inputs(case)
    ours = _ours(case, tensors)
    theirs = oracle_results[k]
    assert ours.shape == theirs.shape
    if case["dtype"] == "bfloat16":
        # mergekit returns bf16 from float32 arithmetic: ours rounded the same way, within 1 ulp.
        ours_b = ours.to(torch.bfloat16).float()
        ulp = theirs.float().abs().clamp(min=1e-30) * 2.0**-7
        assert ((ours_b - theirs.float()).abs() <= ulp).all()
        assert (ours_b == theirs.float()).float().mean() > 0.97
    elif case["quant"] and case["method"] in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        tied = _at_thresholds(case, tensors)
        assert 0 < tied.float().mean() < 0.6
        torch.testing.assert_close(ours[~tied], theirs.float()[~tied], rtol=2e-5, atol=2e-6)
    else:
        torch.testing.assert_close(ours, theirs.float(), rtol=2e-5, atol=2e-6)


def _at_thresholds(case, tensors) -> torch.Tensor:
    """Where some model's ``|d|`` equals one of its magnitude thresholds (the ambiguous elements)."""
    base = tensors[case["base"]]
    takers = [i for i in range(len(tensors)) if i != case["base"]]
    tied = torch.zeros(base.shape, dtype=torch.bool)
    for j, i in enumerate(takers):
        mags = (tensors[i] - base).abs()
        ordered = mags.flatten().sort().values
        n, density = ordered.numel(), case["per"]["density"][j]
        if case["method"] == "ties":
            thresholds = [ordered[n - max(1, int(density * n))]]
        else:
            keep = int(density * n)
            n_bot = max(0, n - keep - int(case["per"]["gamma"][j] * n))
            thresholds = [ordered[n_bot], ordered[n_bot + keep - 1]]
        for t in thresholds:
            tied |= mags == t
    return tied
