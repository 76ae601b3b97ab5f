"""The planner on real tiny checkpoints: sources, layer remapping, parameters, errors, caching."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from test_params import mergekit_python_or_skip

import merge_core.planner as planner_mod
from merge_core.errors import MergeError, ModelError, RecipeError
from merge_core.plan_types import MergePlan, TensorSource
from merge_core.planner import Planner, plan_merge, tensor_seed, torch_dtype
from merge_core.recipe import parse_recipe
from tiny_models import make_tiny_llama

LAYER = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "post_attention_layernorm", "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny checkpoints (4 layers unless named otherwise), all under one directory."""
    root = tmp_path_factory.mktemp("zoo")
    make_tiny_llama(root / "base", seed=0, tokenizer=False)
    make_tiny_llama(root / "a", seed=1, tokenizer=False)
    make_tiny_llama(root / "b", seed=2, shards=2, tokenizer=False)
    make_tiny_llama(root / "c", seed=3, tokenizer=False)
    make_tiny_llama(root / "tied", seed=4, tokenizer=False, tie_word_embeddings=True)
    make_tiny_llama(root / "tied2", seed=5, tokenizer=False, tie_word_embeddings=True)
    make_tiny_llama(root / "six", seed=6, tokenizer=False, num_hidden_layers=6)
    make_tiny_llama(root / "vocab100", seed=7, tokenizer=False, vocab_size=100)
    make_tiny_llama(root / "wide", seed=8, tokenizer=False, intermediate_size=48)
    make_tiny_llama(root / "mistral", seed=9, tokenizer=False, architectures=["MistralForCausalLM"],
                    model_type="mistral")
    make_tiny_llama(root / "qwen", seed=10, tokenizer=False, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    return root


def plan(zoo: Path, text: str, **kw) -> MergePlan:
    return plan_merge(parse_recipe(text), relative_to=zoo, **kw)


def task_map(p: MergePlan) -> dict:
    return {t.output: t for t in p.tasks}


def refs(p: MergePlan, task) -> list[tuple[str, str]]:
    return [(p.models[s.model].reference, s.tensor) for s in task.sources]


def failure(zoo: Path, text: str, exc: type[MergeError] = MergeError) -> str:
    with pytest.raises(exc) as err:
        plan(zoo, text)
    message = str(err.value)
    assert "\n" not in message
    return message


TIES = """
merge_method: ties
base_model: base
models:
  - model: a
    parameters:
      weight: [0, 1]
      density: [{filter: mlp, value: 0.5}]
  - model: b
    parameters: {weight: 0.3}
parameters: {normalize: false, density: 0.9}
dtype: bfloat16
"""


def test_models_form_with_unlisted_base(zoo: Path):
    p = plan(zoo, TIES)
    assert [m.reference for m in p.models] == ["a", "b", "base"]
    assert p.models[0].path == (zoo / "a").resolve() and p.models[0].config["num_hidden_layers"] == 4
    assert p.base_model == 2 and p.dtype == torch.bfloat16 and p.out_dtype == torch.bfloat16
    assert p.out_config["num_hidden_layers"] == 4 and p.out_config["torch_dtype"] == "bfloat16"
    assert p.extra["merge_method"] == "ties"
    assert len(p.tasks) == 1 + 4 * 9 + 2
    tasks = task_map(p)
    first, last = p.tasks[0], p.tasks[-1]
    assert first.output == "model.embed_tokens.weight" and last.output == "lm_head.weight"
    t = tasks["model.layers.1.mlp.up_proj.weight"]
    assert refs(p, t) == [(m, "model.layers.1.mlp.up_proj.weight") for m in ("a", "b", "base")]
    assert t.base_index == 2 and t.method == "ties" and t.seed is None
    assert t.params.global_ == {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0}
    # weight: gradient over 4 layers -> 1/3 at layer 1; density: model filter matches mlp, else the
    # global 0.9 (mergekit's fallback from a non-matching model filter to the top level)
    assert t.params.per_model[0] == pytest.approx({"weight": 1 / 3, "density": 0.5})
    assert t.params.per_model[1] == {"weight": 0.3, "density": 0.9}
    assert t.params.per_model[2] == {}  # the base takes no per-model parameters
    q = tasks["model.layers.3.self_attn.q_proj.weight"]
    assert q.params.per_model[0] == {"weight": 1.0, "density": 0.9}
    # non-layer tensors evaluate gradients at t = 0
    assert tasks["model.norm.weight"].params.per_model[0]["weight"] == 0.0
    assert first.params.per_model[0]["weight"] == 0.0


def test_slices_remap_layers(zoo: Path):
    p = plan(zoo, """
merge_method: slerp
base_model: a
slices:
  - sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [2, 4]}]
  - sources: [{model: b, layer_range: [1, 4]}, {model: a, layer_range: [0, 3]}]
    parameters: {t: [0, 1]}
parameters: {t: [0.2, 0.8]}
""")
    assert p.out_config["num_hidden_layers"] == 5
    assert len(p.tasks) == 1 + 5 * 9 + 2
    tasks = task_map(p)
    assert refs(p, tasks["model.layers.1.mlp.down_proj.weight"]) == [
        ("a", "model.layers.1.mlp.down_proj.weight"), ("b", "model.layers.3.mlp.down_proj.weight")]
    assert refs(p, tasks["model.layers.4.self_attn.q_proj.weight"]) == [
        ("b", "model.layers.3.self_attn.q_proj.weight"), ("a", "model.layers.2.self_attn.q_proj.weight")]
    assert [tasks[f"model.layers.{i}.input_layernorm.weight"].params.global_["t"] for i in range(5)] == [
        0.2, 0.8, 0.0, 0.5, 1.0]
    assert [tasks[f"model.layers.{i}.input_layernorm.weight"].base_index for i in range(5)] == [0, 0, 1, 1, 1]
    # embeddings from the first slice's sources, norm/lm_head from the last slice's, both at t = 0
    assert [s for s, _ in refs(p, tasks["model.embed_tokens.weight"])] == ["a", "b"]
    assert tasks["model.embed_tokens.weight"].params.global_ == {"t": 0.2}
    assert [s for s, _ in refs(p, tasks["lm_head.weight"])] == ["b", "a"]
    assert tasks["lm_head.weight"].params.global_ == {"t": 0.0}


def test_passthrough_frankenmerge(zoo: Path):
    p = plan(zoo, """
merge_method: passthrough
slices:
  - sources: [{model: a, layer_range: [0, 3]}]
  - sources: [{model: six, layer_range: [2, 6], parameters: {scale: [{filter: o_proj, value: 0.5}]}}]
dtype: float16
""")
    assert p.out_config["num_hidden_layers"] == 7 and p.base_model is None
    tasks = task_map(p)
    assert refs(p, tasks["model.layers.6.mlp.up_proj.weight"]) == [("six", "model.layers.5.mlp.up_proj.weight")]
    assert refs(p, tasks["model.layers.2.mlp.up_proj.weight"]) == [("a", "model.layers.2.mlp.up_proj.weight")]
    assert tasks["model.layers.3.self_attn.o_proj.weight"].params.per_model == [{"scale": 0.5}]
    assert tasks["model.layers.3.self_attn.q_proj.weight"].params.per_model == [{}]  # optional, unset
    assert refs(p, tasks["model.embed_tokens.weight"]) == [("a", "model.embed_tokens.weight")]
    assert refs(p, tasks["model.norm.weight"]) == [("six", "model.norm.weight")]
    assert p.out_dtype == torch.float16


def test_tied_embeddings(zoo: Path):
    all_tied = plan(zoo, "merge_method: linear\nmodels: [{model: tied, parameters: {weight: 1}},"
                         " {model: tied2, parameters: {weight: 1}}]")
    assert "lm_head.weight" not in task_map(all_tied)
    assert all_tied.tasks[-1].output == "model.norm.weight"
    mixed = plan(zoo, """
merge_method: linear
models:
  - {model: a, parameters: {weight: 1}}
  - {model: tied, parameters: {weight: [{filter: lm_head, value: 3}, {value: 1}]}}
""")
    head = task_map(mixed)["lm_head.weight"]
    assert refs(mixed, head) == [("a", "lm_head.weight"), ("tied", "model.embed_tokens.weight")]
    # per-model filters see the output weight name, as in mergekit
    assert head.params.per_model == [{"weight": 1.0}, {"weight": 3.0}]
    assert head.base_index is None


def test_slice_base_model_and_modules(zoo: Path):
    p = plan(zoo, """
merge_method: task_arithmetic
base_model: a
slices:
  - sources: [{model: a, layer_range: [0, 2], parameters: {weight: 0.1}}, {model: b, layer_range: [0, 2]}]
  - sources: [{model: a, layer_range: [2, 4]}, {model: b, layer_range: [2, 4]}]
    base_model: b
parameters: {weight: 0.7}
""")
    tasks = task_map(p)
    assert tasks["model.layers.0.mlp.up_proj.weight"].base_index == 0
    assert tasks["model.layers.0.mlp.up_proj.weight"].params.per_model == [{}, {"weight": 0.7, "density": 1.0}]
    assert tasks["model.layers.3.mlp.up_proj.weight"].base_index == 1
    assert tasks["model.layers.3.mlp.up_proj.weight"].params.per_model == [{"weight": 0.7, "density": 1.0}, {}]
    m = plan(zoo, """
merge_method: linear
modules:
  default:
    models: [{model: a, parameters: {weight: 2}}, {model: b}]
    parameters: {weight: 0.5, normalize: false}
parameters: {weight: 9, normalize: true}
""")
    t = m.tasks[0]
    assert t.params.global_ == {"normalize": False} and t.params.per_model == [{"weight": 2.0}, {"weight": 0.5}]


def test_seeds_for_randomized_methods(zoo: Path):
    text = "merge_method: dare_ties\nbase_model: base\nmodels: [{model: a, parameters: {weight: 1, density: 0.5}}]"
    p1, p2 = plan(zoo, text, seed=7), plan(zoo, text, seed=7)
    seeds = [t.seed for t in p1.tasks]
    assert all(isinstance(s, int) for s in seeds) and len(set(seeds)) == len(seeds)
    assert seeds == [t.seed for t in p2.tasks]
    assert seeds[0] == tensor_seed(7, p1.tasks[0].output)
    assert [t.seed for t in plan(zoo, text, seed=8).tasks] != seeds
    assert [t.seed for t in plan(zoo, text).tasks] == [tensor_seed(0, t.output) for t in p1.tasks]


def test_dtype_names():
    assert torch_dtype("bfloat16") is torch.bfloat16 and torch_dtype("torch.float32") is torch.float32
    assert torch_dtype(None) is None


@pytest.mark.parametrize(
    ("text", "prefix"),
    [
        ("merge_method: slerp\nbase_model: a\nslices:\n - sources: [{model: a, layer_range: [0, 5]}, "
         "{model: b, layer_range: [0, 5]}]\nparameters: {t: 0.5}",
         "slices[0].sources[0].layer_range: end 5 > num_hidden_layers 4 of 'a'"),
        ("merge_method: slerp\nbase_model: a\nslices:\n - sources: [{model: a, layer_range: [0, 2]}, "
         "{model: six, layer_range: [4, 6]}]\n - sources: [{model: six, layer_range: [0, 2]}, {model: a, "
         "layer_range: [3, 5]}]\nparameters: {t: 0.5}",
         "slices[1].sources[1].layer_range: end 5 > num_hidden_layers 4 of 'a'"),
        ("merge_method: slerp\nbase_model: c\nslices:\n - sources: [{model: a, layer_range: [0, 2]}, "
         "{model: b, layer_range: [0, 2]}]\nparameters: {t: 0.5}",
         "base_model: 'c' is not one of the models merged in slices[0]; merge_method slerp needs its base_model"),
        ("merge_method: slerp\nslices:\n - sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 2]}]"
         "\n   base_model: c\nparameters: {t: 0.5}", "slices[0].base_model: 'c' is not one of the models"),
        ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}, {model: c}]\nparameters: {t: 0.5}",
         "models: merge_method slerp: needs exactly 2 models, got 3"),
        ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]", "models: merge_method ties: base_model"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}, {model: six, parameters: {weight: 1}}]",
         "models[1].model: 'six' has 6 layers but 'a' has 4"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}, {model: ./nope}]",
         "models[1].model: no such directory './nope'"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}, {model: b}, {model: org/absent}]",
         "models[2].model: 'org/absent' is neither a directory nor in the Hugging Face cache"),
        ("merge_method: linear\nbase_model: c\nmodels: [{model: a, parameters: {weight: 1}}]",
         "base_model: merge_method linear needs parameter 'weight' for 'c'"),
        ("merge_method: ties\nbase_model: c\nmodels: [{model: a, parameters: {density: 0.5}}]",
         "models[0].parameters.weight: merge_method ties needs parameter 'weight' for 'a'"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}, {model: b}]\nparameters: {weight: 1}"
         "\ntokenizer_source: c", "tokenizer_source: 'c' is not one of the merged models"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ntokenizer: {source: base, tokens: "
         "{x: {source: zz}}}", "tokenizer.tokens['x'].source: 'zz' is not one of the merged models"),
        ("merge_method: linear\nmodules: {vision: {models: [{model: a, parameters: {weight: 1}}]}}",
         "modules.vision: only single-module models are supported"),
    ],
)
def test_recipe_errors_need_models(zoo: Path, text: str, prefix: str):
    message = failure(zoo, text, RecipeError)
    assert message.startswith(prefix), message


@pytest.mark.parametrize(
    ("other", "expected"),
    [
        ("vocab100", "vocab-size mismatch: 'a' has 96 tokens but 'vocab100' has 100; set tokenizer_source: union"),
        ("wide", "tensor model.layers.0.mlp.down_proj.weight: shape [32, 64] in 'a' but [32, 48] in 'wide'"),
        ("mistral", "architecture mismatch: 'mistral' is MistralForCausalLM but 'a' is LlamaForCausalLM"),
    ],
)
def test_model_errors(zoo: Path, other: str, expected: str):
    text = f"merge_method: linear\nmodels: [{{model: a}}, {{model: {other}}}]\nparameters: {{weight: 1}}"
    message = failure(zoo, text, ModelError)
    assert message.startswith(expected), message


def test_allow_crimes_and_missing_tensor(zoo: Path):
    text = "merge_method: linear\nmodels: [{model: a}, {model: mistral}]\nparameters: {weight: 1}"
    assert len(plan(zoo, text, allow_crimes=True).tasks) == 39
    # The layout is the checkpoint's own: a Qwen2 without q/k/v biases is merged as it is...
    assert len(plan(zoo, "merge_method: linear\nmodels: [{model: qwen}]\nparameters: {weight: 1}").tasks) == 39
    # ...but layers merged together must hold the same tensors.
    from safetensors.torch import load_file, save_file

    holes = zoo / "holes"
    if not holes.exists():
        make_tiny_llama(holes, seed=11, tokenizer=False)
        sd = load_file(str(holes / "model.safetensors"))
        del sd["model.layers.1.self_attn.q_proj.weight"]
        save_file(sd, str(holes / "model.safetensors"))
    msg = failure(zoo, "merge_method: linear\nmodels: [{model: a}, {model: holes}]\nparameters: {weight: 1}",
                  ModelError)
    assert msg == ("layer 1 of 'holes' and layer 1 of 'a' differ in their tensors (e.g. "
                   "self_attn.q_proj.weight): they cannot be merged"), msg


def test_corrupt_and_pickled_models(zoo: Path, tmp_path: Path):
    bad = tmp_path / "bad"
    make_tiny_llama(bad, seed=0, tokenizer=False)
    (bad / "model.safetensors").write_bytes(b"\xff" * 4)
    msg = failure(zoo, f"merge_method: linear\nmodels: [{{model: a}}, {{model: '{bad}'}}]\nparameters: {{weight: 1}}")
    assert msg.startswith(f"models[1].model: {bad / 'model.safetensors'}: corrupt safetensors header")
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"x")
    msg = failure(zoo, f"merge_method: linear\nmodels: [{{model: a}}, {{model: '{bad}'}}]\nparameters: {{weight: 1}}")
    assert "pickles are refused" in msg


def test_planner_caches_models_and_replans_parameters(zoo: Path, monkeypatch: pytest.MonkeyPatch):
    planner = Planner(relative_to=zoo)
    first = planner.plan(parse_recipe(TIES))

    def no_io(*args, **kwargs):
        raise AssertionError("re-planning read a file")

    monkeypatch.setattr(planner_mod, "load_model", no_io)
    changed = parse_recipe(TIES.replace("weight: 0.3", "weight: 0.6").replace("normalize: false", "normalize: true"))
    second = planner.plan(changed)
    t1, t2 = task_map(first), task_map(second)
    name = "model.layers.2.mlp.up_proj.weight"
    assert t1[name].params.per_model[1]["weight"] == 0.3 and t2[name].params.per_model[1]["weight"] == 0.6
    assert t2[name].params.global_["normalize"] is True
    assert [t.sources for t in first.tasks] == [t.sources for t in second.tasks]
    # a different layout over the same models is planned without reading files either
    sliced = planner.plan(parse_recipe("""
merge_method: ties
base_model: base
slices: [{sources: [{model: a, layer_range: [1, 3], parameters: {weight: 1}}, {model: base, layer_range: [0, 2]}]}]
"""))
    assert sliced.out_config["num_hidden_layers"] == 2


def test_planner_from_model_infos(zoo: Path):
    from merge_core.model_ref import load_model_info

    infos = {ref: load_model_info(ref, zoo / ref) for ref in ("a", "b")}
    p = Planner(infos).plan(parse_recipe("merge_method: linear\nmodels: [{model: a}, {model: b}]\n"
                                         "parameters: {weight: 0.5}"))
    assert [m.path for m in p.models] == [zoo / "a", zoo / "b"]
    assert p.tasks[5].sources == (TensorSource(0, p.tasks[5].output), TensorSource(1, p.tasks[5].output))


# --- differential test against mergekit 0.1.5's own planner ---------------------------------

ORACLE = r"""
import json, sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from mergekit.architecture import get_architecture_info
from mergekit.plan import MergePlanner
from mergekit.merge import _model_out_config
from mergekit.io.tasks import LoaderCache
def resolve(model, weight):
    # the name mergekit's LoadTensor actually reads (tied lm_head -> embeddings)
    present = LoaderCache().get(model).index.tensor_paths
    names = [weight.name, *(weight.aliases or ()), *(weight.tied_names or ())]
    return next((n for n in names if n in present), weight.name)
out = []
for path in sys.argv[1:]:
    cfg = MergeConfiguration.model_validate(yaml.safe_load(open(path)))
    opts = MergeOptions()
    arch = get_architecture_info(cfg, opts)
    LoaderCache().setup(options=opts)
    out_cfg = _model_out_config(cfg, arch)
    planner = MergePlanner(cfg, arch, opts, out_cfg)
    planner._plan()
    tasks = []
    for weight, task in planner._tensors:
        wi = task.gather_tensors.weight_info
        tasks.append({
            "output": weight.name,
            "sources": [[str(m), resolve(m, wi[m])] for m in task.model_order],
            "base": str(task.base_model) if task.base_model else None,
            "global": dict(task.parameters.items()),
            "per_model": {str(m): dict(v.items()) for m, v in task.input_parameters.items()},
        })
    out.append({"tasks": tasks, "num_layers": out_cfg.num_hidden_layers})
print(json.dumps(out))
"""

ORACLE_RECIPES = [
    """
merge_method: ties
base_model: {base}
models:
  - model: {base}
    parameters: {{weight: 5, density: 0.1}}
  - model: {a}
    parameters:
      density: 0.5
      weight: [{{filter: mlp, value: [0, 0.5, 1]}}, {{filter: layers.2., value: 0.7}}]
  - model: {b}
    parameters: {{density: "7e-1", weight: [0.2, 0.9, 0.1]}}
parameters: {{normalize: false, int8_mask: true, weight: 0.25, lambda: [1, 0.5]}}
dtype: bfloat16
""",
    """
merge_method: slerp
base_model: {a}
slices:
  - sources: [{{model: {a}, layer_range: [0, 3]}}, {{model: {b}, layer_range: [1, 4]}}]
    parameters: {{t: [{{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}}, {{filter: mlp, value: [1, 0]}}]}}
  - sources: [{{model: {b}, layer_range: [3, 4]}}, {{model: {a}, layer_range: [3, 4]}}]
parameters: {{t: [0.1, 0.6]}}
""",
    """
merge_method: dare_ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: [{{filter: q_proj, value: 0.9}}]}}
  - model: {c}
parameters: {{weight: [0.3, 0.6], density: [{{filter: norm, value: 1}}, {{value: 0.4}}]}}
""",
    """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: [{{filter: lm_head, value: 2}}, {{value: 1}}]}}
  - model: {tied}
    parameters: {{weight: 0.5}}
parameters: {{normalize: false}}
""",
    """
merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 3]}}]
  - sources: [{{model: {six}, layer_range: [1, 6], parameters: {{scale: [{{filter: o_proj, value: 0.5}}]}}}}]
""",
    """
merge_method: task_arithmetic
base_model: {base}
modules:
  default:
    models: [{{model: {a}, parameters: {{weight: 1}}}}, {{model: {base}}}]
    parameters: {{lambda: [0.5, 1.5]}}
parameters: {{normalize: true}}
""",
]


@pytest.mark.slow
@pytest.mark.mergekit
def test_plans_match_mergekit(zoo: Path, tmp_path: Path):
    python = mergekit_python_or_skip()
    names = {n: str(zoo / n) for n in ("base", "a", "b", "c", "tied", "six")}
    files = []
    for i, text in enumerate(ORACLE_RECIPES):
        file = tmp_path / f"r{i}.yml"
        file.write_text(text.format(**names))
        files.append(file)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([python, "-c", ORACLE, *map(str, files)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    expected_plans = json.loads(res.stdout.strip().splitlines()[-1])
    for file, expected in zip(files, expected_plans):
        ours = plan_merge(parse_recipe(file.read_text()), relative_to=tmp_path)
        assert ours.out_config["num_hidden_layers"] == expected["num_layers"], file
        # The same tensors (in another order: ours is the checkpoint's, mergekit's its table's).
        assert sorted(t.output for t in ours.tasks) == sorted(t["output"] for t in expected["tasks"]), file
        by_output = {t["output"]: t for t in expected["tasks"]}
        for task in ours.tasks:
            exp = by_output[task.output]
            where = f"{file.name} {task.output}"
            assert [list(r) for r in refs(ours, task)] == exp["sources"], where
            base = ours.models[task.sources[task.base_index].model].reference if task.base_index is not None else None
            if ours.extra["merge_method"] not in ("linear", "passthrough"):  # base is ignored there
                assert base == exp["base"], where
            assert set(task.params.global_) <= set(exp["global"]), where
            assert task.params.global_ == {k: exp["global"][k] for k in task.params.global_}, where
            for i, src in enumerate(task.sources):
                mk = exp["per_model"][ours.models[src.model].reference]
                mk = {k: v for k, v in mk.items() if v is not None}
                assert task.params.per_model[i] == mk, where
