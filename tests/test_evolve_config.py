"""The evolve config: mergekit-evolve's schema accepted unchanged, one-line errors with YAML paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evolve.config import EvolveConfig, config_hash, load_evolve_config, parse_evolve_config
from merge_core.errors import RecipeError

EXAMPLE = Path(__file__).parent / "data/shared_examples/evolve/evol_merge_config.yml"
REPO = Path(__file__).resolve().parents[1]


def base_config(**overrides) -> dict:
    data = {
        "genome": {"models": ["org/a", "org/b"], "merge_method": "ties", "base_model": "org/base"},
        "tasks": [{"name": "t1", "weight": 0.4}, {"name": "t2", "weight": 0.6}],
    }
    data.update(overrides)
    return data


def error_of(data) -> str:
    with pytest.raises(RecipeError) as info:
        parse_evolve_config(data)
    text = str(info.value)
    assert "\n" not in text, text
    return text


def test_example_config_loads_unchanged_with_mergekit_defaults():
    config = load_evolve_config(EXAMPLE)
    g = config.genome
    assert g.models == [
        "NousResearch/Hermes-2-Pro-Mistral-7B",
        "PocketDoc/Dans-AdventurousWinds-Mk2-7b",
        "HuggingFaceH4/zephyr-7b-beta",
    ]
    assert (g.merge_method, g.base_model, g.layer_granularity) == ("task_arithmetic", "mistralai/Mistral-7B-v0.1", 8)
    assert g.allow_negative_weights is True and g.normalize is None and g.filters is None and g.smooth is False
    assert [(t.name, t.weight, t.metric) for t in config.tasks] == [
        ("alpaca_prompt_format", 0.4, "acc,none"),
        ("spartqa_train", 0.6, "acc,none"),
    ]
    # mergekit 0.1.5's EvolMergeConfiguration defaults
    assert config.limit is None and config.num_fewshot is None
    assert config.shuffle is False and config.random_init is False
    assert config.apply_chat_template is True and config.fewshot_as_multiturn is True
    assert config.held_out == [] and config.vllm is None


def test_task_shorthand_equals_explicit_defaults_and_hash():
    short = parse_evolve_config(base_config(tasks=["t1"]))
    full = parse_evolve_config(base_config(tasks=[{"name": "t1", "weight": 1.0, "metric": "acc,none"}]))
    assert short == full
    assert config_hash(short) == config_hash(full)
    other = parse_evolve_config(base_config(tasks=[{"name": "t1", "weight": 0.5}]))
    assert config_hash(other) != config_hash(full)


def test_config_hash_is_stable_across_processes():
    code = (
        "from evolve.config import parse_evolve_config, config_hash;"
        "print(config_hash(parse_evolve_config({'genome': {'models': ['a', 'b'], 'merge_method': 'linear'},"
        "'tasks': ['t']})))"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": str(seed), "PATH": "/usr/bin"}).stdout.strip()
        for seed in (1, 2)
    }
    local = config_hash(parse_evolve_config({"genome": {"models": ["a", "b"], "merge_method": "linear"}, "tasks": ["t"]}))
    assert outs == {local}


def test_our_additions_are_accepted():
    config = parse_evolve_config(
        base_config(
            held_out=[{"name": "h1", "metric": "acc_norm,none", "split": "validation"}, "h2"],
            tasks=[{"name": "t1", "split": "train"}],
            vllm={"gpu_memory_utilization": 0.5, "max_model_len": 2048, "dtype": "float32", "enforce_eager": True,
                  "tensor_parallel_size": 1, "max_num_seqs": 8, "batch_size": 16},
            limit=50, num_fewshot=0,
        )
    )
    assert [t.name for t in config.held_out] == ["h1", "h2"]
    assert config.held_out[0].split == "validation" and config.tasks[0].split == "train"
    assert config.vllm.max_num_seqs == 8 and config.vllm.batch_size == 16
    assert parse_evolve_config(base_config(vllm={})).vllm.batch_size == "auto"


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                                    "della", "slerp"])
def test_all_supported_methods(method):
    genome = {"models": ["a", "b"], "merge_method": method, "base_model": "base"}
    assert isinstance(parse_evolve_config({"genome": genome, "tasks": ["t"]}), EvolveConfig)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d.update(bogus=1), "unknown key(s) 'bogus'"),
        (lambda d: d["genome"].update(layer_granulerity=8, smoth=True), "genome: unknown key(s) 'layer_granulerity', 'smoth'"),
        (lambda d: d["tasks"][1].update(wieght=1), "tasks[1]: unknown key(s) 'wieght'"),
        (lambda d: d["genome"]["models"].append(3), "genome.models[2]: "),
        (lambda d: d["genome"]["models"].append("org/a"), "genome.models[2]: 'org/a' is already genome.models[0]"),
        (lambda d: d["tasks"][0].update(weight="heavy"), "tasks[0].weight: "),
        (lambda d: d["tasks"][0].update(weight=float("nan")), "tasks[0].weight: must be a finite number"),
        (lambda d: d["genome"].update(merge_method="model_stock"), "genome.merge_method: unsupported method 'model_stock'"),
        (lambda d: d["genome"].pop("base_model"), "genome.base_model: required for merge_method ties"),
        (lambda d: d["genome"].pop("models"), "genome.models: Field required"),
        (lambda d: d.pop("tasks"), "tasks: Field required"),
        (lambda d: d.update(tasks=[]), "tasks: at least one task is required"),
        (lambda d: d["genome"].update(layer_granularity=-1), "genome.layer_granularity: must be >= 0"),
        (lambda d: d["genome"].update(merge_method="slerp", smooth=True), "genome.smooth: not supported with merge_method slerp"),
        (lambda d: d["genome"].update(merge_method="slerp", filters=["mlp"]), "genome.filters: not supported"),
        (lambda d: d["genome"].update(merge_method="slerp", models=["a"]), "genome.models: slerp needs at least two"),
        (lambda d: d["genome"].update(filters=["mlp", "mlp"]), "genome.filters[1]: duplicate filter 'mlp'"),
        (lambda d: d.update(tasks=[{"name": "t", "weight": 0}]), "tasks: all task weights are 0"),
        (lambda d: d.update(tasks=["t", "t"]), "tasks[1]: task 't' metric 'acc,none' repeats tasks[0]"),
        (lambda d: d.update(held_out=[{"name": "h", "weight": "x"}]), "held_out[0].weight: "),
        (lambda d: d.update(num_fewshot=-1), "num_fewshot: must be >= 0"),
        (lambda d: d.update(limit=0), "limit: must be >= 1"),
        (lambda d: d.update(shuffle="maybe"), "shuffle: "),
        (lambda d: d.update(vllm={"gpu_memory_utilization": 1.5}), "vllm.gpu_memory_utilization: must be in (0, 1]"),
        (lambda d: d.update(vllm={"dtype": "int4"}), "vllm.dtype: unknown dtype 'int4'"),
        (lambda d: d.update(vllm={"batch_size": "big"}), "vllm.batch_size: "),
        (lambda d: d.update(vllm={"swap_space": 4}), "vllm: unknown key(s) 'swap_space'"),
        (lambda d: d.update(vllm={"tensor_parallel_size": 2}), "vllm.tensor_parallel_size: must be 1 (got 2)"),
        (lambda d: d.update(fewshot_seed=-1), "fewshot_seed: must be in [0, 2**32)"),
    ],
)
def test_errors_name_the_yaml_path_in_one_line(mutate, expected):
    data = base_config()
    mutate(data)
    text = error_of(data)
    assert text.startswith(expected), text


def test_unsupported_method_lists_the_choices():
    text = error_of(base_config(genome={"models": ["a"], "merge_method": "passthrough"}))
    for method in ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "della", "slerp"):
        assert method in text


def test_file_level_errors(tmp_path):
    with pytest.raises(RecipeError, match="cannot read evolve config"):
        load_evolve_config(tmp_path / "missing.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("genome: [unclosed\n")
    with pytest.raises(RecipeError, match=r"bad\.yml: invalid YAML at line"):
        load_evolve_config(bad)
    scalar = tmp_path / "scalar.yml"
    scalar.write_text("just a string\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_evolve_config(scalar)
    good = tmp_path / "good.yml"
    good.write_text(yaml.safe_dump(base_config()))
    assert load_evolve_config(good).genome.merge_method == "ties"


@pytest.mark.parametrize("method, models", [
    ("breadcrumbs_ties", ["a", "b", "c"]), ("della_linear", ["a", "b"]), ("multislerp", ["a", "b", "c"]),
    ("nuslerp", ["a", "b"]), ("sce", ["a", "b", "c"]), ("nearswap", ["a"]), ("ram", ["a", "b"]),
    ("ramplus_tl", ["a", "b"]), ("nearswap", ["base", "a"]),  # the base listed too: still one other model
])
def test_more_searchable_methods(method, models):
    genome = {"models": models, "merge_method": method, "base_model": "base"}
    assert isinstance(parse_evolve_config({"genome": genome, "tasks": ["t"]}), EvolveConfig)


@pytest.mark.parametrize("genome, expected", [
    ({"merge_method": "karcher"}, "genome.merge_method: unsupported method 'karcher': nothing to search: "
                                  "mergekit 0.1.5 gives karcher no per-model parameter"),
    ({"merge_method": "arcee_fusion", "models": ["org/a"]},
     "genome.merge_method: unsupported method 'arcee_fusion': nothing to search: mergekit 0.1.5 gives "
     "arcee_fusion no parameter at all"),
    ({"merge_method": "nearswap"}, "genome.models: merge_method nearswap takes exactly 1 model besides its "
                                   "base_model, got 2"),
    ({"merge_method": "nuslerp", "models": ["a", "b", "c"]},
     "genome.models: merge_method nuslerp takes exactly 2 models besides its base_model, got 3"),
    ({"merge_method": "sce", "base_model": None}, "genome.base_model: required for merge_method sce"),
    ({"merge_method": "ramplus_tl", "normalize": True}, "genome.normalize: merge_method ramplus_tl has no normalize"),
    ({"merge_method": "sce", "weight_range": [0.0, 1.0]}, "genome.weight_range: merge_method sce has no weight gene"),
])
def test_more_methods_refusals_name_the_field(genome, expected):
    text = error_of(base_config(genome={**base_config()["genome"], **genome}))
    assert text.startswith(expected), text
    if "merge_method:" in expected:
        assert "choose one of linear" in text and "ramplus_tl" in text
