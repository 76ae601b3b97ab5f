"""multislerp, karcher, nearswap, arcee_fusion, ram and ramplus_tl on hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from merge_core.methods import get_method
from merge_core.methods.base import MethodError, TensorInputs, TensorParams


def merge(name: str, tensors: list[list[float]], base: int | None = None, glob: dict | None = None,
          per: list[dict] | None = None) -> torch.Tensor:
    inputs = TensorInputs("w", [torch.tensor(t, dtype=torch.float32) for t in tensors], base)
    return get_method(name).merge(inputs, TensorParams(glob or {}, per or [{} for _ in tensors]))


def close(got: torch.Tensor, want: list[float], tol: float = 1e-6) -> None:
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=tol, atol=tol)


def unit(degrees: float, length: float = 1.0) -> list[float]:
    return [length * math.cos(math.radians(degrees)), length * math.sin(math.radians(degrees))]


def test_nearswap_takes_close_elements_and_moves_t_towards_far_ones():
    got = merge("nearswap", [[0.0, 0.0, 0.0, 1.0], [0.05, 0.2, -1.0, 1.0]], 0, {"t": 0.1})
    close(got, [0.05, 0.1, -0.1, 1.0])  # |d| <= t: the model; else base + t * sign(d); equal: either


def test_ram_keeps_lone_changes_and_averages_shared_ones():
    deltas = [[1.0, 2.0, 6.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 4.0, 1.0]]
    models = [[0.5 + d for d in row] for row in deltas]
    base = [[0.5] * 5]
    close(merge("ram", base + models, 0), [3.5, 2.5, 6.5, 4.5, 1.5])
    # epsilon 1.6: changes of 1.6 or less do not count (element 0 averages 3 and 5 only)
    close(merge("ram", base + models, 0, {"epsilon": 1.6}), [4.5, 2.5, 6.5, 4.5, 0.5])


def test_ramplus_tl_scales_lone_changes_by_each_models_share_ratio():
    models = [[1.0, 2.0, 6.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 4.0, 1.0]]
    # m0: 1 shared / 2 alone -> rho 0.5 -> 1 + 0.5 * 0.5; m2 likewise; m1 changes nothing alone.
    got = merge("ramplus_tl", [[0.0] * 5] + models, 0, {"r": 0.5, "alpha": 0.6})
    close(got, [3.0, 2.5, 7.5, 5.0, 1.25])
    close(merge("ramplus_tl", [[0.0] * 5] + models, 0, {"r": 0.5, "alpha": 0.2}), [3.0, 2.2, 6.6, 4.4, 1.1])
    close(merge("ramplus_tl", [[0.0] * 5] + models, 0, {"r": 0.0}), [3.0, 2.0, 6.0, 4.0, 1.0])  # = ram


def test_ram_of_the_base_alone_is_the_base():
    close(merge("ram", [[1.0, -2.0]], 0), [1.0, -2.0])
    close(merge("ramplus_tl", [[1.0, -2.0]], 0), [1.0, -2.0])


def test_karcher_is_the_intrinsic_mean_on_the_circle():
    # Two orthogonal directions: halfway, times the mean length.
    close(merge("karcher", [unit(0, 2.0), unit(90, 4.0)]), unit(45, 3.0))
    # Directions 0, 0, 90 degrees: the Karcher mean is the mean angle (30), the Euclidean
    # start point (max_iter 0) is atan(1/2) = 26.57 degrees.
    three = [unit(0), unit(0), unit(90)]
    close(merge("karcher", three, glob={"max_iter": 50, "tol": 1e-9}), unit(30.0), tol=1e-5)
    close(merge("karcher", three, glob={"max_iter": 0}), unit(math.degrees(math.atan(0.5))))
    # Zero-length models add their length (0) to the mean length but no direction.
    close(merge("karcher", [unit(0, 2.0), unit(90, 4.0), [0.0, 0.0]]), unit(45, 2.0))
    close(merge("karcher", [[0.0, 0.0], [0.0, 0.0]]), [0.0, 0.0])


def test_karcher_max_iter_must_be_whole():
    with pytest.raises(MethodError, match="karcher: max_iter: expected a whole number, got 2.5"):
        merge("karcher", [unit(0), unit(90)], glob={"max_iter": 2.5})


def test_multislerp_averages_directions_and_lengths():
    per = [{"weight": 1.0}, {"weight": 1.0}]
    close(merge("multislerp", [unit(0, 2.0), unit(90, 4.0)], per=per), unit(45, 3.0))
    # Three models: the normalized weighted Euclidean mean of the unit vectors (unlike karcher).
    three = [unit(0), unit(0), unit(90)]
    close(merge("multislerp", three, per=[{"weight": 1.0}] * 3), unit(math.degrees(math.atan(0.5))))
    # With a base, on the task vectors.
    got = merge("multislerp", [[1.0, 1.0], [3.0, 1.0], [1.0, 5.0]], 0, per=[{}, {"weight": 0.5}, {"weight": 0.5}])
    close(got, [1.0 + 3.0 / math.sqrt(2), 1.0 + 3.0 / math.sqrt(2)])
    # normalize_weights: false scales the length by the weights' sum.
    close(merge("multislerp", [unit(0, 2.0), unit(90, 4.0)], glob={"normalize_weights": False},
                per=[{"weight": 2.0}, {"weight": 2.0}]), unit(45, 12.0), tol=1e-5)


def test_multislerp_single_model_and_antipodes():
    close(merge("multislerp", [[1.0, 1.0], [7.0, -3.0]], 0, per=[{}, {"weight": 0.1}]), [7.0, -3.0])
    # Antipodal pair with equal weights: linear interpolation (0 here); three models: refused.
    close(merge("multislerp", [[1.0, 0.0], [-1.0, 0.0]], per=[{"weight": 1.0}] * 2), [0.0, 0.0])
    with pytest.raises(MethodError, match="multislerp: the weighted mean of the unit vectors of w is zero"):
        merge("multislerp", [[1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]],
              per=[{"weight": 2.0}, {"weight": 1.0}, {"weight": 1.0}])
    with pytest.raises(MethodError, match="weights sum to 0"):
        merge("multislerp", [[1.0, 0.0], [0.0, 1.0]], per=[{"weight": 1.0}, {"weight": -1.0}])


def test_arcee_fusion_takes_the_model_where_importance_reaches_median_plus_1_5_iqr():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(40, 30, generator=gen)
    model = base + 0.3 * torch.randn(40, 30, generator=gen) ** 3  # heavy tails: a few large changes
    got = get_method("arcee_fusion").merge(TensorInputs("w", [base, model], 0), TensorParams({}, [{}, {}]))
    p, q = torch.softmax(model, -1) + 1e-8, torch.softmax(base, -1) + 1e-8
    importance = (model - base).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    q1, med, q3 = torch.quantile(importance.flatten(), torch.tensor([0.25, 0.5, 0.75]), interpolation="lower")
    keep = importance >= med + 1.5 * (q3 - q1)
    assert 0.01 < keep.float().mean() < 0.3
    assert torch.equal(got, torch.where(keep, model, base))
