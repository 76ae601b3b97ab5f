
"""bf16 parity with mergekit 0.1.5: what the README claims, asserted element by element.

The claim (README, "merge-yaml"): with ``dtype: bfloat16`` the inputs are rounded to bf16 on load,
as mergekit does; then every tensor is computed in float32 and rounded once, and a magnitude cut
(ties, breadcrumbs) breaks ties in ``|d|`` by flat index.  mergekit-yaml 0.1.5 instead computes
in bf16, rounding after every operation (task vector, weights, products, sums, division, lambda,
the final add), and keeps whichever tied elements ``torch.argsort`` puts first.  So against
mergekit's *float32* computation of the same bf16 inputs (``dtype: float32``, ``out_dtype:
bfloat16``) ours is identical except

* elements where some model's ``|d|`` ties at a cut (counted: such a tie may be decided otherwise),
* at most 1 bf16 ulp where float32 roundings of a different operation order fall on the two sides
  of a bf16 rounding boundary (rare: counted, and held under 1% of the elements),
* results that cancel to about 0, within float32 rounding of the inputs (2^-20 of
  ``|base| + sum |model|`` at that element, e.g. 1e-10 where mergekit gives exactly 0);

and mergekit's own bf16 result differs from both by its per-operation rounding (reported, with
``-s``: about 10-17% of the elements by 1 ulp or more).  The randomized methods (DARE, DELLA) draw
their masks differently from mergekit (another RNG, see README): their arithmetic is checked by
handing mergekit's merge function our masks, with the same three-part claim.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merge_core.cli import main as merge_yaml
from merge_core.kernels.random_fields import draw_seed
from merge_core.kernels.sparsify import Masker, make_plan
from merge_core.methods import get_method
from merge_core.methods.base import TensorInputs, TensorParams
from tiny_models import load_checkpoint_tensors, make_tiny_llama

pytestmark = [pytest.mark.mergekit, pytest.mark.slow]

CANCEL = 2.0**-20  # float32 rounding of the inputs, relative to |base| + sum |model|
MAX_ULP_FRACTION = 0.01  # 1-ulp disagreements off the ties must stay rare (rounded once)


@pytest.fixture(scope="module")
def bf16_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bf16 base and three fine-tune-like bf16 models (base + 0.1 * random), 6 layers."""
    root = tmp_path_factory.mktemp("bf16_zoo")
    base = load_file(str(make_tiny_llama(root / "raw_base", seed=10, num_hidden_layers=6) / "model.safetensors"))
    out = {}
    for name, seed in (("base", None), ("m1", 11), ("m2", 12), ("m3", 13)):
        path = make_tiny_llama(root / name, seed=seed or 10, num_hidden_layers=6, dtype=torch.bfloat16)
        if seed is not None:
            own = load_file(str(make_tiny_llama(root / f"raw_{name}", seed=seed, num_hidden_layers=6)
                                / "model.safetensors"))
            weights = {k: (base[k] + 0.1 * own[k]).to(torch.bfloat16) for k in base}
        else:
            weights = {k: v.to(torch.bfloat16) for k, v in base.items()}
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
        out[name] = path
    return out


# method, recipe parameters, (model, its parameters) -- every sparsifying deterministic method,
# task_arithmetic and linear.
CASES: dict[str, tuple[str, dict, list[tuple[str, dict | None]]]] = {
    "linear": ("linear", {}, [("m1", {"weight": 0.5}), ("m2", {"weight": 0.3}), ("m3", {"weight": 0.2})]),
    "task_arithmetic": ("task_arithmetic", {"lambda": 1.3},
                        [("m1", {"weight": 0.6}), ("m2", {"weight": -0.3}), ("m3", {"weight": 1.0})]),
    "ties": ("ties", {}, [("m1", {"weight": 0.5, "density": 0.5}), ("m2", {"weight": 0.3, "density": 0.7}),
                          ("m3", {"weight": 0.4, "density": 0.3})]),
    "ties_unnormalized": ("ties", {"normalize": False},
                          [(m, {"weight": 1.0, "density": 0.7}) for m in ("m1", "m2", "m3")]),
    "breadcrumbs": ("breadcrumbs", {"rescale": True},
                    [("m1", {"weight": 0.5, "density": 0.8, "gamma": 0.05}),
                     ("m2", {"weight": 0.5, "density": 0.6, "gamma": 0.02})]),
    "breadcrumbs_ties": ("breadcrumbs_ties", {},
                         [("m1", {"weight": 0.5, "density": 0.8, "gamma": 0.05}),
                          ("m2", {"weight": 0.7, "density": 0.6, "gamma": 0.02})]),
    "sce": ("sce", {"select_topk": 0.5}, [("m1", None), ("m2", None), ("m3", None)]),
}


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns as integers in value order: adjacent bf16 numbers differ by 1."""
    bits = x.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (_ordered(a) - _ordered(b)).abs()


def _ties_at_cuts(method: str, params: list[dict], base: torch.Tensor, models: list[torch.Tensor],
                  select_topk: float = 1.0) -> torch.Tensor:
    """Elements where a magnitude cut is ambiguous: some model's non-zero |d| (or, for sce, the
    variance across models) equals a threshold (positions as mergekit's sorts take them)."""
    tied = torch.zeros(base.shape, dtype=torch.bool)
    deltas = [m.float() - base.float() for m in models]  # exact: bf16 differences fit in float32
    if method == "sce":
        if select_topk < 1:
            var = torch.var(torch.stack(deltas), dim=0, unbiased=False)
            k = int(int(torch.count_nonzero(var)) * select_topk)
            if k > 0:
                tied |= var == var.flatten().topk(k).values[-1]
        return tied
    if method not in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        return tied
    for d, p in zip(deltas, params):
        mags = d.abs()
        ordered = mags.flatten().sort().values
        n = ordered.numel()
        if method == "ties":
            cuts = [ordered[n - max(1, int(p["density"] * n))]]
        else:
            keep = int(p["density"] * n)
            n_bot = max(0, n - keep - int(p["gamma"] * n))
            cuts = [ordered[n_bot], ordered[min(n_bot + keep - 1, n - 1)]]
        for cut in cuts:
            if cut > 0:  # a zero |d| adds nothing, kept or not
                tied |= mags == cut
    return tied


def _compare(ours: torch.Tensor, exact: torch.Tensor, tied: torch.Tensor, scale: torch.Tensor) -> dict[str, int]:
    """Check the three-part claim for one tensor; return its counts."""
    ulps = _ulps(ours, exact)
    off = ~tied
    cancel = (ours.float() - exact.float()).abs() <= CANCEL * scale
    bad = off & (ulps > 1) & ~cancel
    assert not bad.any(), f"{int(bad.sum())} elements off the ties differ by more than 1 ulp (max {int(ulps[bad].max())})"
    return {"elements": ours.numel(), "tied": int(tied.sum()), "tied_differ": int((tied & (ulps > 0)).sum()),
            "ulp1": int((off & (ulps == 1)).sum()), "cancelled": int((off & (ulps > 1)).sum())}


def _report(case: str, counts: dict[str, int], vs_bf16: dict[str, float]) -> None:
    n = counts["elements"]
    assert counts["ulp1"] <= MAX_ULP_FRACTION * n, counts
    print(f"[bf16 vs mergekit] {case}: {n} elements; vs mergekit float32 -> bf16: identical but "
          f"{counts['tied_differ']} of {counts['tied']} tied at a cut, {counts['ulp1']} by 1 ulp, "
          f"{counts['cancelled']} cancelled to ~0; vs mergekit bf16: {int(vs_bf16['differ'])} differ "
          f"({vs_bf16['differ'] / n:.1%}), {int(vs_bf16['over1'])} by > 1 ulp, max abs {vs_bf16['max']:.3g}")


def _mergekit_yaml(mergekit_py: str, recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    config = out.with_suffix(".yml")
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    proc = subprocess.run([str(Path(mergekit_py).parent / "mergekit-yaml"), str(config), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return load_checkpoint_tensors(out)


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_yaml_bf16_is_mergekit_float32_rounded_once(case, bf16_zoo, tmp_path: Path, mergekit_py: str):
    method, glob, models = CASES[case]
    recipe: dict = {"merge_method": method, "dtype": "bfloat16",
                    "models": [{"model": str(bf16_zoo[m]), **({"parameters": p} if p else {})} for m, p in models]}
    if method != "linear":
        recipe["base_model"] = str(bf16_zoo["base"])
    if glob:
        recipe["parameters"] = glob
    config = tmp_path / "ours.yml"
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert merge_yaml([str(config), str(tmp_path / "ours"), "--quiet"]) == 0
    ours = load_checkpoint_tensors(tmp_path / "ours")
    exact = _mergekit_yaml(mergekit_py, {**recipe, "dtype": "float32", "out_dtype": "bfloat16"}, tmp_path / "mk32")
    theirs = _mergekit_yaml(mergekit_py, recipe, tmp_path / "mk16")
    assert sorted(ours) == sorted(exact) == sorted(theirs)
    base = load_checkpoint_tensors(bf16_zoo["base"])
    inputs = {m: load_checkpoint_tensors(bf16_zoo[m]) for m, _ in models}
    totals: dict[str, float] = {}
    vs_bf16 = {"differ": 0.0, "over1": 0.0, "max": 0.0}
    for name, got in ours.items():
        assert got.dtype == exact[name].dtype == torch.bfloat16, name
        xs = [inputs[m][name] for m, _ in models]
        tied = _ties_at_cuts(method, [p or {} for _, p in models], base[name], xs,
                             float(glob.get("select_topk", 1.0)))
        scale = base[name].float().abs() + sum(x.float().abs() for x in xs)
        try:
            counts = _compare(got, exact[name], tied, scale)
        except AssertionError as err:
            raise AssertionError(f"{case}: {name}: {err}") from None
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + value
        ulps = _ulps(got, theirs[name])
        vs_bf16["differ"] += int((ulps > 0).sum())
        vs_bf16["over1"] += int((ulps > 1).sum())
        vs_bf16["max"] = max(vs_bf16["max"], float((got.float() - theirs[name].float()).abs().max()))
    if method in ("linear", "sce"):
        assert totals["tied_differ"] == totals["ulp1"] == totals["cancelled"] == 0  # bit for bit
    _report(case, {k: int(v) for k, v in totals.items()}, vs_bf16)


# -- the randomized methods: our masks handed to mergekit's merge functions ------------------

ORACLE = r"""
import sys, torch
from mergekit import merge_methods
from mergekit.merge_methods.base import TensorGroup

root = sys.argv[1]
cases = torch.load(f"{root}/cases.pt")
queue = []
torch.bernoulli = lambda p, *a, **k: queue.pop(0).reshape(p.shape).to(p.dtype)  # our masks, in entry order
out = []
for case in cases:
    res = {}
    for dtype in ("float32", "bfloat16"):
        queue[:] = list(case["masks"])
        tensors = [t.to(getattr(torch, dtype)) for t in case["tensors"]]
        group = TensorGroup.from_tensors(tensors, base_index=0, name="w")
        (res[dtype],) = merge_methods.get(case["method"])([group], parameters=case["params"])
        assert not queue, "mergekit drew another number of masks"
    out.append(res)
torch.save(out, f"{root}/out.pt")
"""

RANDOM_CASES = [
    ("dare_linear", {}, {"weight": [0.6, 0.5], "density": [0.5, 0.7]}),
    ("dare_linear", {"rescale": False, "normalize": True}, {"weight": [0.6, 0.5], "density": [0.5, 0.7]}),
    ("dare_ties", {}, {"weight": [0.6, 0.5, 0.3], "density": [0.5, 0.7, 0.4]}),
    ("della", {}, {"weight": [0.6, 0.5], "density": [0.5, 0.6], "epsilon": [0.1, 0.2]}),
    ("della_linear", {"lambda": 1.3}, {"weight": [0.6, 0.5], "density": [0.5, 0.6], "epsilon": [0.1, 0.2]}),
]


def _random_case(method: str, glob: dict, per: dict, seed: int) -> tuple[dict, torch.Tensor]:
    """bf16 inputs, our merge (float32 math, one rounding) and the masks it drew."""
    gen = torch.Generator().manual_seed(seed)
    shape = (256, 192)
    base = torch.randn(shape, generator=gen) * 0.05
    tensors = [base] + [base + 0.005 * torch.randn(shape, generator=gen) for _ in per["weight"]]
    tensors = [t.to(torch.bfloat16) for t in tensors]
    impl = get_method(method)
    per_model = [{}] + [{k: v[j] for k, v in per.items()} for j in range(len(per["weight"]))]
    ours = impl.merge(TensorInputs("w", tensors, 0), TensorParams(glob, per_model),
                      generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    stream = draw_seed(torch.Generator().manual_seed(seed), method)  # the seed that merge drew
    probe = TensorInputs("w", tensors, 0)
    masks = []
    for i in range(1, len(tensors)):
        plan = make_plan(impl.sparsification, probe, i, float(per["density"][i - 1]), False,
                         epsilon=float(per.get("epsilon", [0.0] * len(tensors))[i - 1]), seed=stream)
        kept = torch.ones(base.numel())
        Masker(probe, kept.numel()).apply(plan, i, kept, 0)
        masks.append(kept.reshape(shape))
    return {"method": method, "tensors": tensors, "masks": masks, "params": {**glob, **per}}, ours


def test_randomized_methods_bf16_arithmetic_is_mergekit_float32_rounded_once(tmp_path: Path, mergekit_py: str):
    cases = [_random_case(method, glob, per, seed=7 + k) for k, (method, glob, per) in enumerate(RANDOM_CASES)]
    torch.save([c for c, _ in cases], tmp_path / "cases.pt")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([mergekit_py, "-c", ORACLE, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt")
    for (case, ours), res, (method, glob, _) in zip(cases, results, RANDOM_CASES):
        label = f"{method}{glob or ''}"
        assert 0.2 < float(torch.stack(case["masks"]).mean()) < 0.8  # the masks really drop elements
        exact = res["float32"].to(torch.bfloat16)
        scale = sum(t.float().abs() for t in case["tensors"])
        try:
            counts = _compare(ours, exact, torch.zeros(ours.shape, dtype=torch.bool), scale)
        except AssertionError as err:
            raise AssertionError(f"{label}: {err}") from None
        theirs = res["bfloat16"]
        ulps = _ulps(ours, theirs)
        _report(label, counts, {"differ": float((ulps > 0).sum()), "over1": float((ulps > 1).sum()),
                                "max": float((ours.float() - theirs.float()).abs().max())})
