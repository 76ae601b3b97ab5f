"""Contract tests run against every registered merge method (like optuna's sampler tests)."""

from __future__ import annotations

import pytest
import torch

from merge_core.methods import METHODS, get_method, method_names
from merge_core.methods.base import MergeMethod, MethodError, ParamSpec, TensorInputs, TensorParams

ALL = method_names()
TASK_VECTOR = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
               "della", "della_linear"]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 700 elements: every test crosses chunk boundaries (tensors have 1,536)."""
    monkeypatch.setattr("merge_core.kernels.chunking.CPU_CHUNK", 700)


def _tensors(n: int, dtype=torch.float32, shape=(48, 32), seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    return [(base + 0.2 * torch.randn(shape, generator=gen)).to(dtype) for _ in range(n)]


def setup(name: str, dtype=torch.float32, seed=0, **overrides):
    """A valid (inputs, params) for ``name``; ``overrides`` replace global / per-model values."""
    method = get_method(name)
    if name == "passthrough":
        tensors, base = _tensors(1, dtype, seed=seed), None
    elif name in ("slerp", "nearswap", "arcee_fusion"):
        tensors, base = _tensors(2, dtype, seed=seed), 0
    elif method.base_rule == "ignored" or name == "nuslerp":
        tensors, base = _tensors(3 if name != "nuslerp" else 2, dtype, seed=seed), None
    else:
        tensors, base = _tensors(4, dtype, seed=seed), 0
    glob = {"t": 0.3} if name == "slerp" else {"t": 0.1} if name == "nearswap" else {}
    per_model = []
    for i in range(len(tensors)):
        values = {}
        if not (i == base and method.base_rule != "ignored"):
            for spec in method.model_params:
                if spec.name == "weight":
                    values["weight"] = 0.3 + 0.1 * i
                elif spec.name == "density":
                    values["density"] = 0.5
        per_model.append(values)
    for key, value in overrides.items():
        if key in {s.name for s in method.global_params}:
            glob[key] = value
        else:
            for values in per_model:
                if values:
                    values[key] = value
    return method, TensorInputs("model.layers.0.mlp.up_proj.weight", tensors, base), TensorParams(glob, per_model)


def run(method, inputs, params, seed=1, out=None):
    gen = torch.Generator().manual_seed(seed) if method.randomized else None
    return method.merge(inputs, params, out=out, generator=gen)


# --- registry ----------------------------------------------------------------------------------

def test_registry_names_and_protocol():
    assert set(ALL) == {
        "linear", "slerp", "nuslerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
        "breadcrumbs_ties", "della", "della_linear", "model_stock", "sce", "passthrough", "multislerp", "karcher",
        "nearswap", "arcee_fusion", "ram", "ramplus_tl",
    }
    for name in ALL:
        method = get_method(name)
        assert isinstance(method, MergeMethod)
        assert method.name == name and METHODS[name] is type(method)
        assert method.base_rule in ("required", "optional", "ignored")
        for spec in method.global_params + method.model_params:
            assert isinstance(spec, ParamSpec)
            assert spec.required == (spec.name in {"weight", "t"})


def test_unknown_method_lists_known_ones():
    with pytest.raises(MethodError, match=r"unknown merge_method 'frob'; known: linear, slerp"):
        get_method("frob")


def test_randomized_flags():
    assert {n for n in ALL if get_method(n).randomized} == {"dare_ties", "dare_linear", "della", "della_linear"}


# --- one-hot weights give that model -------------------------------------------------------------

ONE_HOT_SKIP = {
    "model_stock": "its ratio comes from the models' angles; no parameter selects one model",
    "sce": "has no weights; its weights come from the task vectors' energy",
    "karcher": "weighs every model equally (no parameter selects one)",
    "arcee_fusion": "has no parameters; its mask comes from the tensors",
    "ram": "has no weights; what each model alone changes is kept",
    "ramplus_tl": "has no weights; what each model alone changes is kept",
}


@pytest.mark.parametrize("name", ALL)
def test_one_hot_returns_that_model(name):
    if name in ONE_HOT_SKIP:
        pytest.skip(ONE_HOT_SKIP[name])
    method, inputs, params = setup(name)
    pick = len(inputs.tensors) - 1
    if name == "slerp":
        for t, want in ((0.0, inputs.base_index), (1.0, 1 - inputs.base_index)):
            got = run(method, inputs, TensorParams({"t": t}, params.per_model))
            torch.testing.assert_close(got, inputs.tensors[want], rtol=1e-6, atol=1e-6)
        return
    if name == "nearswap":  # t = 0 keeps the base; a t above every difference takes the other model
        for t, want in ((0.0, inputs.base_index), (1e9, 1 - inputs.base_index)):
            got = run(method, inputs, TensorParams({"t": t}, params.per_model))
            torch.testing.assert_close(got, inputs.tensors[want], rtol=0, atol=0)
        return
    per_model = []
    for i, values in enumerate(params.per_model):
        values = dict(values)
        if "weight" in values:
            values["weight"] = 1.0 if i == pick else 0.0
        if "density" in values:
            values["density"] = 1.0
        per_model.append(values)
    got = run(method, inputs, TensorParams(params.global_, per_model))
    torch.testing.assert_close(got, inputs.tensors[pick], rtol=1e-6, atol=1e-6)


# --- shapes, dtypes, out= ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_matches_fresh_result_and_keeps_dtype(name, dtype):
    method, inputs, params = setup(name, dtype=dtype)
    fresh = run(method, inputs, params)
    assert fresh.shape == inputs.tensors[0].shape and fresh.dtype == torch.float32
    assert all(fresh.data_ptr() != t.data_ptr() for t in inputs.tensors)
    for out_dtype in (torch.float32, torch.bfloat16):
        out = torch.full(inputs.tensors[0].shape, float("nan"), dtype=out_dtype)
        got = run(method, inputs, params, out=out)
        assert got is out and out.dtype == out_dtype
        assert torch.equal(out, fresh.to(out_dtype))


@pytest.mark.parametrize("name", ALL)
def test_non_contiguous_out(name):
    method, inputs, params = setup(name)
    fresh = run(method, inputs, params)
    out = torch.zeros(tuple(reversed(inputs.tensors[0].shape))).t()
    assert not out.is_contiguous()
    assert run(method, inputs, params, out=out) is out
    assert torch.equal(out, fresh)


@pytest.mark.parametrize("name", ALL)
def test_one_dimensional_tensor(name):
    method, inputs, params = setup(name)
    vectors = TensorInputs("norm.weight", [t[0].clone() for t in inputs.tensors], inputs.base_index)
    got = run(method, vectors, params)
    assert got.shape == (inputs.tensors[0].shape[1],) and torch.isfinite(got).all()


# --- cache --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_warm_cache_equals_fresh_inputs(name):
    method, inputs, params = setup(name, dtype=torch.bfloat16)
    inputs.reuse = True  # the in-memory merger's inputs: caches kept between calls
    first = run(method, inputs, params)
    # Other parameter values in between must not leak through the cache.
    other = {"t": 0.9} if name in ("slerp", "nearswap") else {}
    per_model = [
        {k: (v * 0.5 if k in ("weight", "density") else v) for k, v in values.items()} for values in params.per_model
    ]
    run(method, inputs, TensorParams({**params.global_, **other}, per_model))
    again = run(method, inputs, params)
    fresh_inputs = TensorInputs(inputs.name, list(inputs.tensors), inputs.base_index)  # one-shot path
    assert torch.equal(again, first)
    assert torch.equal(run(method, fresh_inputs, params), first)
    if name in TASK_VECTOR:
        assert not fresh_inputs.cache  # one-shot: no sorted magnitudes, random fields or ranks kept


# --- randomness ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_seeded_randomness(name):
    method, inputs, params = setup(name)
    a = run(method, inputs, params, seed=7)
    b = run(method, TensorInputs(inputs.name, inputs.tensors, inputs.base_index), params, seed=7)
    assert torch.equal(a, b)
    c = run(method, inputs, params, seed=8)
    if method.randomized:
        assert not torch.equal(a, c)
    else:
        assert torch.equal(a, c)
        assert torch.equal(a, method.merge(inputs, params))  # needs no generator


@pytest.mark.parametrize("name", [n for n in ALL if get_method(n).randomized])
def test_randomized_needs_generator(name):
    method, inputs, params = setup(name)
    with pytest.raises(MethodError, match="generator"):
        method.merge(inputs, params)


# --- bad parameters and model counts ---------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in ALL if any(s.name == "density" for s in get_method(n).model_params)])
@pytest.mark.parametrize("density", [1.5, -0.1])
def test_density_out_of_range(name, density):
    method, inputs, params = setup(name, density=density)
    with pytest.raises(MethodError, match=rf"{name}: model 1: density: .*(above|below)"):
        run(method, inputs, params)


@pytest.mark.parametrize("name", [n for n in ALL if any(s.name == "weight" for s in get_method(n).model_params)])
def test_missing_weight(name):
    method, inputs, params = setup(name)
    per_model = [dict(v) for v in params.per_model]
    last = len(per_model) - 1
    del per_model[last]["weight"]
    with pytest.raises(MethodError, match=rf"{name}: model {last}: missing required parameter 'weight'"):
        run(method, inputs, TensorParams(params.global_, per_model))


@pytest.mark.parametrize("name", [n for n in ALL if get_method(n).global_params + get_method(n).model_params])
def test_bad_param_type(name):
    method, inputs, params = setup(name)
    spec = (method.global_params + method.model_params)[0]
    bad = "yes" if spec.kind == "bool" else True
    if spec in method.global_params:
        params = TensorParams({**params.global_, spec.name: bad}, params.per_model)
    else:
        skip = inputs.base_index if method.base_rule != "ignored" else None
        params = TensorParams(params.global_, [
            v if i == skip else {**v, spec.name: bad} for i, v in enumerate(params.per_model)
        ])
    with pytest.raises(MethodError, match=spec.name):
        run(method, inputs, params)


def test_slerp_model_count_and_base():
    method = get_method("slerp")
    with pytest.raises(MethodError, match="exactly 2 models, got 3"):
        method.check_models(3, 0)
    with pytest.raises(MethodError, match="base_model is required"):
        method.check_models(2, None)
    _, inputs, params = setup("slerp")
    with pytest.raises(MethodError, match="slerp: base_model is required"):
        method.merge(TensorInputs("w", inputs.tensors, None), params)
    with pytest.raises(MethodError, match="slerp: missing required parameter 't'"):
        method.merge(inputs, TensorParams({}, params.per_model))


@pytest.mark.parametrize(
    "name, n, base, message",
    [
        ("nuslerp", 3, None, "exactly 2 models besides the base, got 3"),
        ("nuslerp", 2, 0, "exactly 2 models besides the base, got 1"),
        ("model_stock", 2, 0, "at least 3 models, got 2"),
        ("passthrough", 2, None, "exactly 1 model, got 2"),
        ("ties", 3, None, "base_model is required"),
        ("sce", 3, 5, "base index 5"),
        ("nearswap", 3, 0, "exactly 2 models, got 3"),
        ("nearswap", 2, None, "base_model is required"),
        ("arcee_fusion", 1, 0, "exactly 2 models, got 1"),
        ("multislerp", 1, 0, "at least 1 model besides the base, got 0"),
        ("ram", 2, None, "base_model is required"),
    ],
)
def test_model_counts(name, n, base, message):
    with pytest.raises(MethodError, match=message):
        get_method(name).check_models(n, base)


@pytest.mark.parametrize("name", ["linear", "passthrough"])
def test_ignored_base_is_not_checked(name):
    get_method(name).check_models(1, 0)


def test_della_epsilon_must_keep_probabilities_inside():
    method, inputs, params = setup("della", density=0.1, epsilon=0.2)
    with pytest.raises(MethodError, match=r"density 0.1 \+/- epsilon 0.2"):
        run(method, inputs, params)


def test_linear_zero_weight_sum_cannot_normalize():
    method, inputs, _ = setup("linear")
    params = TensorParams({}, [{"weight": 1.0}, {"weight": -1.0}, {"weight": 0.0}])
    with pytest.raises(MethodError, match="sum to 0"):
        method.merge(inputs, params)


def test_wrong_out_shape():
    method, inputs, params = setup("linear")
    with pytest.raises(MethodError, match="out has shape"):
        method.merge(inputs, params, out=torch.empty(3))
