"""Fused (compiled) merge kernels give the eager path's tensors, and are what the merger runs."""

from __future__ import annotations

import pytest
import torch

from merge_core.kernels import fused
from merge_core.methods import get_method
from merge_core.methods.base import TensorInputs, TensorParams

pytestmark = pytest.mark.slow  # compiles a kernel per method structure (a few seconds each)

CASES = [
    ("linear", None, {}, [{"weight": 0.3}, {"weight": 0.5}, {"weight": -0.2}]),
    ("task_arithmetic", 0, {"lambda": 1.3}, [{}, {"weight": 0.6}, {"weight": 0.3}]),
    ("ties", 0, {}, [{}, {"weight": 0.6, "density": 0.3}, {"weight": 0.5, "density": 0.7}]),
    ("ties", 1, {"normalize": False, "lambda": 0.7}, [{"weight": 1.0, "density": 0.2}, {},
                                                     {"weight": -0.6, "density": 1.0}]),
    ("dare_ties", 0, {}, [{}, {"weight": 0.6, "density": 0.3}, {"weight": 0.5, "density": 0.7}]),
    ("dare_linear", 0, {"lambda": 0.8}, [{}, {"weight": 0.6, "density": 0.4}, {"weight": 0.5, "density": 0.9}]),
    ("breadcrumbs", 0, {"lambda": 0.6}, [{}, {"weight": 0.6, "density": 0.5, "gamma": 0.05},
                                         {"weight": 0.4, "density": 0.8, "gamma": 0.0}]),
    ("breadcrumbs_ties", 0, {}, [{}, {"weight": 0.6, "density": 0.5, "gamma": 0.05},
                                 {"weight": 0.4, "density": 0.8, "gamma": 0.1}]),
    # three and four models: TIES normalisation by a table of reciprocals (up to 3) or a division
    ("ties", 0, {}, [{}, {"weight": 0.6, "density": 0.3}, {"weight": 0.5, "density": 0.7},
                     {"weight": -0.4, "density": 0.5}]),
    ("dare_ties", 0, {}, [{}, {"weight": 0.6, "density": 0.3}, {"weight": 0.5, "density": 0.7},
                          {"weight": 0.3, "density": 0.5}, {"weight": 0.2, "density": 0.6}]),
    ("della", 0, {}, [{}, {"weight": 0.6, "density": 0.5, "epsilon": 0.1},
                      {"weight": 0.4, "density": 0.7, "epsilon": 0.2}]),
    ("della_linear", 0, {}, [{}, {"weight": 0.6, "density": 0.5, "epsilon": 0.1},
                             {"weight": 0.4, "density": 0.7, "epsilon": 0.05}]),
    # element-wise against a base: some elements within t / epsilon, some beyond
    ("nearswap", 0, {"t": 0.03}, [{}, {}]),
    ("nearswap", 1, {"t": 0.01}, [{}, {}]),
    ("ram", 0, {"epsilon": 0.04}, [{}, {}, {}]),
    ("ramplus_tl", 0, {"epsilon": 0.04, "r": 0.5, "alpha": 0.8}, [{}, {}, {}, {}]),
]


def _tensors(dtype: torch.dtype, count: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(96, 64, generator=gen)
    # bf16 checkpoints repeat magnitudes: exercises the threshold ties the cuts split by index
    return [(base + 0.05 * torch.randn(96, 64, generator=gen)).to(dtype) if k else base.to(dtype)
            for k in range(count)]


def _merge(name, base, glob, per, tensors, out_dtype, *, fused_on: bool, monkeypatch,
           warm_up: list | None = None) -> torch.Tensor:
    """One merge on fresh reused inputs (after merges with ``warm_up``'s per-model parameters)."""
    monkeypatch.setenv("MERGE_CORE_FUSED", "1" if fused_on else "0")
    inputs = TensorInputs("w", tensors, base, reuse=True)
    for earlier in warm_up or []:
        get_method(name).merge(inputs, TensorParams(glob, earlier), generator=torch.Generator().manual_seed(7))
    out = torch.empty(tensors[0].shape, dtype=out_dtype)
    gen = torch.Generator().manual_seed(7)
    get_method(name).merge(inputs, TensorParams(glob, per), out=out, generator=gen)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,base,glob,per", CASES, ids=[c[0] + str(i) for i, c in enumerate(CASES)])
def test_fused_equals_eager(name, base, glob, per, dtype, monkeypatch):
    monkeypatch.setattr(fused, "FUSE_MIN_ELEMENTS", 1024)
    tensors = _tensors(dtype, len(per))
    ran: list[bool] = []
    real_call = fused._call

    def spy(*args):
        result = real_call(*args)
        ran.append(result is not fused._FAILED)
        return result

    monkeypatch.setattr(fused, "_call", spy)
    got = _merge(name, base, glob, per, tensors, torch.float32, fused_on=True, monkeypatch=monkeypatch)
    assert ran and all(ran), f"the fused kernel did not run: {fused._broken}"
    want = _merge(name, base, glob, per, tensors, torch.float32, fused_on=False, monkeypatch=monkeypatch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # DELLA: keyed (epsilon unchanged)


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_fused_general_della_equals_eager(name, monkeypatch):
    """After an epsilon change DELLA runs its general form (draws and ranks packed per int32):
    the eager result, but for rare elements exactly at a keep boundary (rank * b rounds as
    k * (b / (L-1)) there)."""
    monkeypatch.setattr(fused, "FUSE_MIN_ELEMENTS", 1024)
    _, base, glob, per = next(c for c in CASES if c[0] == name)
    tensors = _tensors(torch.float32, len(per))
    earlier = [dict(p, epsilon=p["epsilon"] / 2) if p else {} for p in per]
    got = _merge(name, base, glob, per, tensors, torch.float32, fused_on=True, monkeypatch=monkeypatch,
                 warm_up=[earlier])
    want = _merge(name, base, glob, per, tensors, torch.float32, fused_on=False, monkeypatch=monkeypatch)
    assert (got - want).abs().gt(1e-5).float().mean() < 2e-3


def test_small_tensors_and_one_shot_merges_stay_eager(monkeypatch):
    tensors = _tensors(torch.float32)
    calls = []
    monkeypatch.setattr(fused, "_call", lambda *a: calls.append(a) or fused._FAILED)
    for reuse in (False, True):  # 6144 elements < FUSE_MIN_ELEMENTS; one-shot never fuses
        inputs = TensorInputs("w", tensors, 0, reuse=reuse)
        get_method("ties").merge(inputs, TensorParams({}, CASES[2][3]), out=torch.empty(96, 64))
    assert calls == []
    monkeypatch.setattr(fused, "FUSE_MIN_ELEMENTS", 1024)
    get_method("ties").merge(TensorInputs("w", tensors, 0, reuse=True), TensorParams({}, CASES[2][3]),
                             out=torch.empty(96, 64))
    assert len(calls) == 1  # large enough and repeated: fused (here refused, so eager ran)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("dare_ties", "della")], ids=lambda c: c[0])
def test_packed_draws_replace_cached_fields_without_changing_eager_results(case, monkeypatch):
    """The fused path packs DARE draws (and DELLA's keys) two models per int32 and drops the
    separate cached fields; an eager merge on the same (reused) inputs afterwards must rebuild
    them and give the fresh eager result."""
    name, base, glob, per = case
    monkeypatch.setattr(fused, "FUSE_MIN_ELEMENTS", 1024)
    tensors = _tensors(torch.float32, len(per))
    inputs = TensorInputs("w", tensors, base, reuse=True)

    def run(fused_on: bool, on: TensorInputs) -> torch.Tensor:
        monkeypatch.setenv("MERGE_CORE_FUSED", "1" if fused_on else "0")
        out = torch.empty(tensors[0].shape)
        get_method(name).merge(on, TensorParams(glob, per), out=out, generator=torch.Generator().manual_seed(7))
        return out

    fused_result = run(True, inputs)
    packed = [k for k in inputs.cache if k.startswith(("pair:", "della_pack:"))]
    assert packed and not any(k.startswith(("draws:", "f32:", "della_rank:", "della_keys:")) for k in inputs.cache)
    again = run(False, inputs)
    fresh = run(False, TensorInputs("w", tensors, base, reuse=True))
    assert torch.equal(again, fresh)
    assert (fused_result - fresh).abs().gt(1e-5).float().mean() < 2e-3


@pytest.mark.parametrize("shape", [(96, 64), (1500,)], ids=["matrix", "vector"])
def test_small_tensors_of_a_large_model_are_fused(shape, monkeypatch):
    """``fuse_small`` (set by the in-memory merger when the model has large tensors) fuses tensors
    below FUSE_MIN_ELEMENTS too; DELLA packs a vector as one row: the eager result either way."""
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(*shape, generator=gen)
    tensors = [base] + [base + 0.05 * torch.randn(*shape, generator=gen) for _ in range(2)]
    name, _, glob, per = CASES[-2]  # della
    ran: list[bool] = []
    real_call = fused._call
    monkeypatch.setattr(fused, "_call", lambda *a: ran.append(True) or real_call(*a))

    def run(fused_on: bool, fuse_small: bool) -> torch.Tensor:
        monkeypatch.setenv("MERGE_CORE_FUSED", "1" if fused_on else "0")
        inputs = TensorInputs("w", tensors, 0, reuse=True, fuse_small=fuse_small)
        out = torch.empty(shape)
        get_method(name).merge(inputs, TensorParams(glob, per), out=out, generator=torch.Generator().manual_seed(7))
        return out

    eager = run(False, True)
    assert not ran
    run(True, False)
    assert not ran  # small and not marked: eager
    got = run(True, True)
    assert ran
    assert (got - eager).abs().gt(1e-5).float().mean() < 2e-3


def test_in_memory_merger_marks_small_tensors_of_large_models(tiny_models, monkeypatch):
    """The merger sets ``fuse_small`` on every tensor's inputs exactly when some input tensor of
    the model reaches FUSE_MIN_ELEMENTS (the toy zoo's never do, so it never compiles)."""
    from merge_core.in_memory import InMemoryMerger
    from merge_core.planner import plan_merge
    from merge_core.recipe import recipe_from_dict

    recipe = {"merge_method": "ties", "base_model": str(tiny_models["base"]), "dtype": "float32", "models": [
        {"model": str(tiny_models[k]), "parameters": {"weight": 0.5, "density": 0.5}} for k in ("a", "b")]}
    plan = plan_merge(recipe_from_dict(recipe), seed=0)
    for threshold, expected in ((1 << 30, False), (1024, True)):
        monkeypatch.setattr(fused, "FUSE_MIN_ELEMENTS", threshold)
        monkeypatch.setenv("MERGE_CORE_FUSED", "0")  # only the marking is under test here
        merger = InMemoryMerger(plan, dtype=torch.float32)
        merger.merged_state_dict(plan)
        assert {inputs.fuse_small for inputs in merger._inputs.values()} == {expected}
