"""Fused (compiled) merge kernels give the eager path's tensors, and are what the merger runs."""

from __future__ import annotations

import pytest
import torch

from merge_core.methods import fused, get_method
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
]


def _tensors(dtype: torch.dtype, count: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(96, 64, generator=gen)
    # bf16 checkpoints repeat magnitudes: exercises the threshold ties the cuts split by index
    return [(base + 0.05 * torch.randn(96, 64, generator=gen)).to(dtype) if k else base.to(dtype)
            for k in range(count)]


def _merge(name, base, glob, per, tensors, out_dtype, *, fused_on: bool, monkeypatch) -> torch.Tensor:
    monkeypatch.setenv("MERGE_CORE_FUSED", "1" if fused_on else "0")
    inputs = TensorInputs("w", tensors, base, reuse=True)
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
    if name.startswith("della"):
        # ceil(rank * b + a) may round once less when fused: rare elements at a keep boundary
        assert (got - want).abs().gt(1e-5).float().mean() < 2e-3
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


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
    """The fused path packs DARE draws two models per int32 and DELLA's draws with its ranks, and
    drops the separate cached fields; an eager merge on the same (reused) inputs afterwards must
    rebuild them and give the fresh eager result."""
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
    packed = [k for k in inputs.cache if k.startswith(("rand_pair:", "della_pack:"))]
    assert packed and not any(k.startswith(("rand16:", "rand32:", "della_rank:")) for k in inputs.cache)
    again = run(False, inputs)
    fresh = run(False, TensorInputs("w", tensors, base, reuse=True))
    assert torch.equal(again, fresh)
    assert (fused_result - fresh).abs().gt(1e-5).float().mean() < 2e-3
