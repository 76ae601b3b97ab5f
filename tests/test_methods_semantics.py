"""Hand-computed examples of what each merge method does (mergekit 0.1.5 semantics)."""

from __future__ import annotations

import math

import pytest
import torch

from merge_core.kernels.plans import Plan
from merge_core.methods import get_method
from merge_core.methods.base import TensorInputs, TensorParams


def merge(name, tensors, base=None, glob=None, per=None, seed=None, **kw):
    """Merge ``tensors`` (lists are made float tensors); ``per`` gives each model's parameters."""
    tensors = [torch.as_tensor(t, dtype=torch.float32) for t in tensors]
    per = per or [{} for _ in tensors]
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return get_method(name).merge(TensorInputs("w", tensors, base), TensorParams(glob or {}, per),
                                  generator=gen, **kw)


def close(got, want, tol=1e-6):
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=torch.float32), rtol=tol, atol=tol)


# --- linear / task arithmetic ----------------------------------------------------------------------

def test_linear_normalize_on_off():
    a, b = [1.0, 2.0], [3.0, -2.0]
    per = [{"weight": 1.0}, {"weight": 3.0}]
    close(merge("linear", [a, b], per=per), [2.5, -1.0])
    close(merge("linear", [a, b], per=per, glob={"normalize": False}), [10.0, -4.0])


def test_task_arithmetic_normalize_and_lambda():
    base, a, b = [1.0, 1.0], [2.0, 1.0], [1.0, 3.0]  # deltas [1, 0] and [0, 2]
    per = [{}, {"weight": 0.5}, {"weight": 1.5}]
    close(merge("task_arithmetic", [base, a, b], 0, per=per), [1.5, 4.0])
    close(merge("task_arithmetic", [base, a, b], 0, per=per, glob={"normalize": True}), [1.25, 2.5])
    close(merge("task_arithmetic", [base, a, b], 0, per=per, glob={"lambda": 2.0}), [2.0, 7.0])


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                                  "breadcrumbs_ties", "della", "della_linear"])
def test_lambda_scales_the_merged_delta_once(name):
    """``base + lambda * mixed`` (a regression: sparsified methods without consensus applied it twice)."""
    gen = torch.Generator().manual_seed(0)
    base, a, b = (torch.randn(4000, generator=gen) for _ in range(3))
    per = [{}, {"weight": 0.7, "density": 0.5}, {"weight": 0.4, "density": 0.6}]
    one = merge(name, [base, a, b], 0, per=per, seed=1, glob={"lambda": 1.0}) - base
    half = merge(name, [base, a, b], 0, per=per, seed=1, glob={"lambda": 0.5}) - base
    close(half, one * 0.5, tol=1e-5)


def test_base_in_models_needs_no_weight_and_zero_weight_is_ignored():
    base, a, b = [0.0, 0.0], [2.0, -2.0], [5.0, 5.0]
    got = merge("ties", [base, a, b], 0, per=[{}, {"weight": 1.0}, {"weight": 0.0}])
    close(got, [2.0, -2.0])  # b (weight 0) neither votes nor counts in the divisor


# --- TIES -----------------------------------------------------------------------------------------

TIES_A = [[1.0, -2.0, 3.0], [0.5, -0.5, 1.0]]
TIES_B = [[-3.0, 1.0, 1.0], [0.5, 1.0, -2.0]]


def test_ties_sign_election_2x3():
    zero = torch.zeros(2, 3)
    per = [{}, {"weight": 1.0}, {"weight": 1.0}]
    # sums [[-2, -1, 4], [1, 0.5, -1]] elect signs [[-, -, +], [+, +, -]].
    close(merge("ties", [zero, TIES_A, TIES_B], 0, per=per), [[-3.0, -2.0, 2.0], [0.5, 1.0, -2.0]])
    close(merge("ties", [zero, TIES_A, TIES_B], 0, per=per, glob={"normalize": False}),
          [[-3.0, -2.0, 4.0], [1.0, 1.0, -2.0]])


def test_ties_zero_sum_elects_plus_and_negative_weight_flips():
    zero = torch.zeros(1)
    close(merge("ties", [zero, [1.0], [-1.0]], 0, per=[{}, {"weight": 1.0}, {"weight": 1.0}]), [1.0])
    # weight -1 turns a's delta 1 into -1, which now agrees with b's -3: (-1 - 3) / (-1 + 1 -> 1).
    close(merge("ties", [zero, [1.0], [-3.0]], 0, per=[{}, {"weight": -1.0}, {"weight": 1.0}]), [-4.0])


def test_ties_magnitude_density_and_rescale():
    zero = torch.zeros(4)
    d = [1.0, -5.0, 3.0, -2.0]
    per = [{}, {"weight": 1.0, "density": 0.5}]
    close(merge("ties", [zero, d], 0, per=per), [0.0, -5.0, 3.0, 0.0])
    close(merge("ties", [zero, d], 0, per=per, glob={"rescale": True}), [0.0, -5.0 * 11 / 8, 3.0 * 11 / 8, 0.0])
    # A positive density keeps at least one element.
    close(merge("ties", [zero, d], 0, per=[{}, {"weight": 1.0, "density": 0.01}]), [0.0, -5.0, 0.0, 0.0])
    close(merge("ties", [zero, d], 0, per=[{}, {"weight": 1.0, "density": 0.0}]), [0.0] * 4)


# --- breadcrumbs ----------------------------------------------------------------------------------

def test_breadcrumbs_drops_top_gamma_and_keeps_density():
    gen = torch.Generator().manual_seed(0)
    mags = torch.randperm(100, generator=gen).float() + 1  # 1..100 shuffled
    d = mags * torch.where(torch.rand(100, generator=gen) < 0.5, -1.0, 1.0)
    got = merge("breadcrumbs", [torch.zeros(100), d], 0, per=[{}, {"weight": 1.0, "density": 0.5, "gamma": 0.1}])
    kept = got != 0
    assert kept.sum() == 50
    assert torch.equal(got[kept], d[kept])
    assert mags[kept].min() == 41 and mags[kept].max() == 90  # the top 10 and the bottom 40 dropped
    # gamma too large for the density: fewer outliers are removed so density is kept.
    got = merge("breadcrumbs", [torch.zeros(100), d], 0, per=[{}, {"weight": 1.0, "density": 0.8, "gamma": 0.5}])
    assert mags[got != 0].min() == 1 and mags[got != 0].max() == 80


# --- DARE / DELLA (distribution) ----------------------------------------------------------------------

N = 200_000


def _random_delta(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, generator=gen)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_kept_fraction_and_rescale(name):
    d = _random_delta()
    zero = torch.zeros(N)
    raw = merge(name, [zero, d], 0, per=[{}, {"weight": 1.0, "density": 0.3}], glob={"rescale": False}, seed=3)
    kept = raw != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.005
    assert torch.equal(raw[kept], d[kept])  # kept elements untouched
    scaled = merge(name, [zero, d], 0, per=[{}, {"weight": 1.0, "density": 0.3}], seed=3)
    assert torch.equal(scaled != 0, kept)  # same mask for the same seed
    # L1 rescale: the kept part gets the original L1 norm, i.e. about 1 / density.
    torch.testing.assert_close(scaled.abs().sum(), d.abs().sum(), rtol=1e-5, atol=0)
    assert abs((scaled[kept] / d[kept]).mean().item() - 1 / 0.3) < 0.05


def test_dare_independent_masks_per_model():
    zero = torch.zeros(N)
    ones = torch.ones(N)
    per = [{}, {"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}]
    got = merge("dare_linear", [zero, ones, ones], 0, per=per, glob={"rescale": False}, seed=1)
    # 0, 1 or 2 copies kept with probabilities 1/4, 1/2, 1/4.
    for value, p in ((0.0, 0.25), (1.0, 0.5), (2.0, 0.25)):
        assert abs((got == value).float().mean().item() - p) < 0.01


def test_della_keeps_large_magnitudes_more_often():
    rows = 400
    d = torch.arange(1, 501, dtype=torch.float32).repeat(rows, 1)  # each row ranks 1..500
    zero = torch.zeros_like(d)
    got = merge("della", [zero, d], 0, per=[{}, {"weight": 1.0, "density": 0.5, "epsilon": 0.2}],
                glob={"rescale": False}, seed=5)
    kept = (got != 0).float()
    assert abs(kept.mean().item() - 0.5) < 0.01
    assert abs(kept[:, :50].mean().item() - 0.32) < 0.02  # probs 0.3 .. 0.34
    assert abs(kept[:, -50:].mean().item() - 0.68) < 0.02  # probs 0.66 .. 0.7


def test_dare_linear_normalize_counts_dropped_models():
    zero, d = torch.zeros(4), torch.ones(4)
    per = [{}, {"weight": 1.0, "density": 1.0}, {"weight": 3.0, "density": 0.0}]
    got = merge("dare_linear", [zero, d, d], 0, per=per, glob={"normalize": True}, seed=0)
    close(got, [0.25] * 4)  # mergekit divides by the sum of all weights


# --- slerp family -------------------------------------------------------------------------------

def test_slerp_orthogonal_and_collinear():
    h = math.sqrt(0.5)
    close(merge("slerp", [[1.0, 0.0], [0.0, 1.0]], 0, glob={"t": 0.5}), [h, h])
    close(merge("slerp", [[1.0, 0.0], [0.0, 1.0]], 1, glob={"t": 0.25}),
          [math.sin(math.pi / 8), math.cos(math.pi / 8)])
    close(merge("slerp", [[1.0, 0.0], [2.0, 0.0]], 0, glob={"t": 0.5}), [1.5, 0.0])  # collinear: lerp


def test_nuslerp_weights_and_base():
    h = math.sqrt(0.5)
    per = [{"weight": 1.0}, {"weight": 1.0}]
    close(merge("nuslerp", [[1.0, 0.0], [0.0, 1.0]], per=per), [h, h])
    per3 = [{}, {"weight": 1.0}, {"weight": 3.0}]  # t = 0.75, on the task vectors
    got = merge("nuslerp", [[1.0, 1.0], [2.0, 1.0], [1.0, 2.0]], 0, per=per3)
    close(got, [1 + math.sin(math.pi / 8), 1 + math.cos(math.pi / 8)])


def test_nuslerp_row_wise():
    a = [[1.0, 0.0], [1.0, 0.0]]
    b = [[0.0, 1.0], [2.0, 0.0]]  # row 0 orthogonal, row 1 collinear
    per = [{"weight": 1.0}, {"weight": 1.0}]
    h = math.sqrt(0.5)
    close(merge("nuslerp", [a, b], per=per, glob={"nuslerp_flatten": False}), [[h, h], [1.5, 0.0]])
    # row_wise: vectors along dim 0, i.e. the columns: [1, 1] vs [0, 2] at 45 degrees, then [0, 0] vs [1, 0].
    got = merge("nuslerp", [a, b], per=per, glob={"nuslerp_flatten": False, "nuslerp_row_wise": True})
    theta = math.pi / 4
    c = math.sin(theta / 2) / math.sin(theta)
    close(got[:, 0], [c * 1.0 + c * 0.0, c * 1.0 + c * 2.0])
    close(got[:, 1], [h, 0.0])  # column 1: [0, 0] vs [1, 0] (zero vector: cos 0)


# --- model_stock / sce / passthrough --------------------------------------------------------------

def test_model_stock_extremes():
    base = [0.0, 0.0, 0.0]
    # Orthogonal task vectors: cos 0 -> t 0 -> the base.
    close(merge("model_stock", [base, [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], 0), base)
    # Identical task vectors: cos 1 -> t 1 -> their average.
    close(merge("model_stock", [base, [1.0, 2.0, 0.0], [1.0, 2.0, 0.0]], 0), [1.0, 2.0, 0.0])
    # cos 0.5 with two models: t = 2 * 0.5 / 1.5 = 2/3.
    got = merge("model_stock", [base, [1.0, 0.0, 0.0], [0.5, math.sqrt(0.75), 0.0]], 0)
    close(got, [2 / 3 * 0.75, 2 / 3 * math.sqrt(0.75) / 2, 0.0])


def test_sce_weights_by_energy_and_erases_minority():
    base = [0.0, 0.0]
    # energies: a = (4 + 0) / 2 = 2, b = (1 + 1) / 2 = 1 -> weights 2/3, 1/3.
    a, b = [2.0, 0.0], [1.0, -1.0]
    close(merge("sce", [base, a, b], 0), [(2 / 3 * 2 + 1 / 3 * 1) / 1.0, -1.0])


def test_sce_select_topk_keeps_high_variance_elements():
    base = [0.0, 0.0, 0.0, 0.0]
    a, b = [1.0, 1.0, 5.0, 0.0], [1.0, -1.0, -5.0, 0.2]
    got = merge("sce", [base, a, b], 0, glob={"select_topk": 0.34})  # k = int(3 nonzero * 0.34) = 1
    assert got[0] == 0 and got[1] == 0 and got[3] == 0 and got[2] != 0


def test_passthrough_scale():
    close(merge("passthrough", [[1.0, -2.0]], per=[{"scale": 0.5}]), [0.5, -1.0])
    close(merge("passthrough", [[1.0, -2.0]]), [1.0, -2.0])


def test_out_aliasing_an_input_is_safe():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    got = get_method("linear").merge(TensorInputs("w", [a, b]), TensorParams({}, [{"weight": 1.0}, {"weight": 1.0}]),
                                     out=b)
    assert got is b
    close(b, [2.0, 3.0])


@pytest.mark.parametrize("reuse", [False, True])
def test_equal_magnitudes_at_threshold_are_kept_in_index_order(reuse, monkeypatch):
    """Of the elements tied at a threshold, the first ones (a stable sort's choice) are kept."""
    monkeypatch.setattr("merge_core.kernels.chunking.CPU_CHUNK", 3)  # the split falls inside a chunk
    d = torch.tensor([1.0, -2.0, 2.0, 0.5, -2.0, 2.0, 3.0, 2.0, -1.0, 2.0])
    zero = torch.zeros_like(d)
    method = get_method("ties")
    # density 0.4: keep 4 of 10 = the 3 and the first three of the six 2s.
    inputs = TensorInputs("w", [zero, d], 0, reuse=reuse)
    got = method.merge(inputs, TensorParams({}, [{}, {"weight": 1.0, "density": 0.4}]))
    close(got, [0.0, -2.0, 2.0, 0.0, -2.0, 0.0, 3.0, 0.0, 0.0, 0.0])
    # density 0.6: the 3 and the first five 2s (the split is then found scanning from the end).
    got = method.merge(inputs, TensorParams({}, [{}, {"weight": 1.0, "density": 0.6}]))
    close(got, [0.0, -2.0, 2.0, 0.0, -2.0, 2.0, 3.0, 2.0, 0.0, 0.0])
    # breadcrumbs, density 0.3, gamma 0.2: the top two (the 3, the last 2) and the bottom five (0.5,
    # the 1s, the first two 2s) are dropped; the three 2s in between stay.
    got = get_method("breadcrumbs").merge(
        inputs, TensorParams({}, [{}, {"weight": 1.0, "density": 0.3, "gamma": 0.2}]))
    close(got, [0.0, 0.0, 0.0, 0.0, -2.0, 2.0, 0.0, 2.0, 0.0, 0.0])


@pytest.mark.parametrize("name,extra", [("ties", {}), ("breadcrumbs", {"gamma": 0.07}),
                                        ("breadcrumbs_ties", {"gamma": 0.2})])
def test_cached_sorted_keys_give_one_shot_results(name, extra):
    """The in-memory merger's sorted (magnitude, index) keys pick the same elements, threshold ties
    split at the same index, as the one-shot partition + scan (bf16 inputs: many equal |d|)."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(300, 70, generator=gen).bfloat16()
    models = [base] + [(base.float() + 0.02 * torch.randn(300, 70, generator=gen)).bfloat16() for _ in range(2)]
    reused = TensorInputs("w", models, 0, reuse=True)
    for density in (0.13, 0.5, 0.77):
        per = [{}, {"weight": 0.6, "density": density, **extra}, {"weight": 0.5, "density": 0.4, **extra}]
        one_shot = get_method(name).merge(TensorInputs("w", models, 0), TensorParams({}, per))
        cached = get_method(name).merge(reused, TensorParams({}, per))
        assert torch.equal(one_shot, cached), density
    assert any(k.startswith("sorted_keys:") for k in reused.cache)


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_rescale_lookup_gives_one_shot_results(name):
    """The in-memory merger finds DELLA's kept L1 by lookup (draws sorted per rank, running sums of
    |d|) instead of a pass over the tensors: same scale, so the same merge as the one-shot pass,
    for several densities/epsilons and a row length with ties in |d| (bf16 inputs)."""
    check_della_lookup_matches_one_shot(name, (257, 96))


@pytest.mark.parametrize("shape", [(1000,), (3, 40, 7)], ids=["vector", "3-d"])
def test_della_rescale_of_vectors_and_3d_tensors(shape):
    """A vector is one row (lookup); a 3-D tensor keeps the second pass: both as the one-shot merge."""
    check_della_lookup_matches_one_shot("della", shape, lookup=len(shape) == 1)


def check_della_lookup_matches_one_shot(name, shape, lookup=True):
    reused, _ = check_della_matches_one_shot(name, shape, ((0.2, 0.1), (0.5, 0.3), (0.9, 0.05)), torch.bfloat16)
    assert any(k.startswith("della_l1:") for k in reused.cache) == lookup


def check_della_matches_one_shot(name, shape, settings, dtype) -> tuple[TensorInputs, list[set[str]]]:
    """Repeated merges on one reused TensorInputs, model 1 with each ``(density, epsilon)`` of
    ``settings`` in turn: each equals the one-shot merge.  Returns the inputs and the cache keys
    after each call."""
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(*shape, generator=gen).to(dtype)
    models = [base] + [(base.float() + 0.02 * torch.randn(*shape, generator=gen)).to(dtype) for _ in range(2)]
    reused = TensorInputs("w", models, 0, reuse=True)
    caches = []
    for density, eps in settings:
        per = [{}, {"weight": 0.6, "density": density, "epsilon": eps},
               {"weight": 0.5, "density": 0.4, "epsilon": 0.2}]
        one_shot = get_method(name).merge(TensorInputs("w", models, 0), TensorParams({}, per),
                                          generator=torch.Generator().manual_seed(3))
        cached = get_method(name).merge(reused, TensorParams({}, per), generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(cached, one_shot, rtol=1e-6, atol=1e-7)
        caches.append(set(reused.cache))
    return reused, caches


def _della_masks(inputs, i, density, eps, seed):
    """The general and the keyed DELLA plan of model ``i`` (fresh caches), and their masks."""
    from merge_core.kernels import della
    from merge_core.kernels.sparsify import Masker

    n = inputs.tensors[i].numel()
    a = math.ceil((density - eps) * 65536 - 32768) - 1
    general = Plan("della", a=float(a), b=2 * eps * 65536, version=seed)
    keyed = della.plan(inputs, i, density, eps, rescale=False, seed=seed)
    assert keyed.kind == "random" and keyed.field == "della_keys"
    masks = []
    for plan in (general, keyed):
        ones = torch.ones(n)
        Masker(inputs, n).apply(plan, i, ones, 0)
        masks.append(ones)
    return general, keyed, masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_della_keys_give_the_general_mask(dtype):
    """Keyed DELLA (rank and draw folded into one 16-bit key) keeps exactly the elements the
    general form keeps, for densities and epsilons from narrow to wide, and the keep rate per
    rank follows mergekit's density - epsilon + 2 epsilon rank."""
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(400, 300, generator=gen).to(dtype)
    model = (base.float() + 0.1 * torch.randn(400, 300, generator=gen)).to(dtype)
    for density, eps in ((0.3, 0.2), (0.6, 0.1), (0.95, 0.04), (0.5, 0.4999), (0.02, 0.015)):
        inputs = TensorInputs("w", [base, model], 0, reuse=True)
        _, _, (general, keyed) = _della_masks(inputs, 1, density, eps, seed=11)
        assert torch.equal(general, keyed), (density, eps)
        from merge_core.kernels.della import rank_norm

        ranks = rank_norm(TensorInputs("w", [base, model], 0), 1).view(400, 300)
        kept = general.view(400, 300)
        low, high = kept[ranks < 0.1].mean(), kept[ranks > 0.9].mean()
        assert abs(float(low) - (density - 0.9 * eps)) < 0.02 and abs(float(high) - (density + 0.9 * eps)) < 0.02


def test_della_lookup_kept_l1_equals_masked_sum():
    from merge_core.kernels.della import della_lookup

    gen = torch.Generator().manual_seed(4)
    base = torch.randn(64, 50, generator=gen)
    model = base + 0.1 * torch.randn(64, 50, generator=gen)
    for density, eps in ((0.3, 0.2), (0.6, 0.1), (0.95, 0.04)):
        inputs = TensorInputs("w", [base, model], 0, reuse=True)
        plan, _, (mask, _) = _della_masks(inputs, 1, density, eps, seed=11)
        kept = float(((model - base).flatten() * mask).abs().sum(dtype=torch.float64))
        lookup = della_lookup(inputs, 1, seed=11)
        assert 0 < kept < lookup.total
        assert lookup.kept(plan.a, plan.b) == pytest.approx(kept, rel=1e-6)


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_switches_to_the_general_form_when_epsilon_changes(name):
    """Repeated merges are keyed while epsilon stays; the first call with another epsilon moves
    the tensor to the general form (keys freed) -- every call equals the one-shot merge."""
    settings = ((0.5, 0.1), (0.4, 0.1), (0.4, 0.2), (0.6, 0.1))
    reused, caches = check_della_matches_one_shot(name, (120, 80), settings, torch.float32)
    assert ["della_keys:1" in keys for keys in caches] == [True, True, False, False]
    assert "della_keys:2" in reused.cache  # model 2 kept its epsilon: still keyed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_della_ranks_equal_magnitudes_in_index_order(dtype):
    # The rank of |d| within a row decides DELLA's keep probability; equal magnitudes (common in
    # bf16 task vectors) must be ranked in index order on every device, so a recipe keeps the same
    # elements wherever it is merged.
    from merge_core.kernels.della import rank_norm

    gen = torch.Generator().manual_seed(3)
    base = torch.zeros(64, 333, dtype=dtype)
    model = (torch.randint(-6, 7, (64, 333), generator=gen).to(torch.float64) / 8).to(dtype)
    ranks = rank_norm(TensorInputs("w", [base, model], 0), 1).view(64, 333).double()
    mags = model.double().abs()
    for row in range(64):
        want = sorted(range(333), key=lambda j: (mags[row, j].item(), j))
        got = torch.argsort(ranks[row]).tolist()
        assert got == want
    assert torch.allclose(ranks.sort(dim=1).values[0], torch.linspace(0, 1, 333, dtype=torch.float64), atol=1e-6)
