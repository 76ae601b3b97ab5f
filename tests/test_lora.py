"""LoRA adapters as inputs (``base+adapter``): merged as PEFT's ``merge_and_unload`` merges them,
as mergekit-yaml merges a recipe with a ``+`` reference, refused in one line when unusable, and
applied once per evolve worker.

PEFT is a test-only oracle: the adapters and PEFT's merged weights are made by a script run in
the mergekit venv (mergekit 0.1.5 brings peft), which the differential tests already need.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merge_core.cli import main as merge_yaml
from merge_core.lora import open_checkpoint
from merge_core.model_ref import load_model
from tiny_models import load_checkpoint_tensors, make_tiny_llama

pytestmark = pytest.mark.mergekit

# name -> LoraConfig keyword arguments (init_lora_weights=False: random A and B, a visible delta)
ADAPTERS = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "rslora_patterns": {"r": 4, "lora_alpha": 16, "use_rslora": True, "target_modules": ["q_proj", "o_proj", "up_proj"],
                        "rank_pattern": {"o_proj": 2}, "alpha_pattern": {"layers.1.self_attn.q_proj": 3}},
    "embedding_and_saved": {"r": 3, "lora_alpha": 6, "target_modules": ["embed_tokens", "k_proj"],
                            "modules_to_save": ["lm_head"]},
    "dora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": True},
}

ORACLE = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    base, out, specs = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    for seed, (name, kwargs) in enumerate(sorted(specs.items())):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        peft = get_peft_model(model, LoraConfig(init_lora_weights=False, **kwargs))
        if kwargs.get("modules_to_save"):  # a trained copy, not the base's
            for module in peft.modules():
                if type(module).__name__ == "ModulesToSaveWrapper":
                    for copy in module.modules_to_save.values():
                        torch.nn.init.normal_(copy.weight, std=0.5)
        peft.save_pretrained(out / name)
        merged = peft.merge_and_unload()
        save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, str(out / f"{name}.merged.safetensors"))
""")


@pytest.fixture(scope="module")
def lora_zoo(tmp_path_factory, mergekit_py) -> dict[str, Path]:
    """A tiny base, a second model of its shape, PEFT adapters of the base (and PEFT's merges)."""
    root = tmp_path_factory.mktemp("lora")
    base = make_tiny_llama(root / "base", seed=0)
    other = make_tiny_llama(root / "other", seed=1)
    wide = make_tiny_llama(root / "wide", seed=2, hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    proc = subprocess.run([mergekit_py, "-c", ORACLE, str(base), str(root / "adapters"), json.dumps(ADAPTERS)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"base": base, "other": other, "wide": wide, "adapters": root / "adapters"}


def _read_all(source) -> dict[str, torch.Tensor]:
    with open_checkpoint(*source) as reader:
        return {name: reader.read(name) for name in reader.names()}


@pytest.mark.parametrize("name", ["plain", "rslora_patterns", "embedding_and_saved"])
def test_base_plus_adapter_reads_as_peft_merge_and_unload(lora_zoo, name):
    adapter = lora_zoo["adapters"] / name
    info = load_model(f"{lora_zoo['base']}+{adapter}")
    ours = _read_all(info.source)
    peft = load_file(str(lora_zoo["adapters"] / f"{name}.merged.safetensors"))
    base = load_file(str(lora_zoo["base"] / "model.safetensors"))
    changed = 0
    for tensor, expected in peft.items():
        assert ours[tensor].dtype == expected.dtype and ours[tensor].shape == expected.shape, tensor
        torch.testing.assert_close(ours[tensor], expected, atol=1e-6, rtol=1e-5, msg=tensor)
        changed += not torch.equal(base[tensor], expected)
    assert changed == len(set(info.adapter.deltas) | set(info.adapter.replacements)) > 0


def test_merge_yaml_with_an_adapter_equals_peft(lora_zoo, tmp_path):
    adapter = lora_zoo["adapters"] / "plain"
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32",
                                      "models": [{"model": f"{lora_zoo['base']}+{adapter}",
                                                  "parameters": {"weight": 1.0}}]}))
    assert merge_yaml([str(recipe), str(tmp_path / "out"), "-q"]) == 0
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    peft = load_file(str(lora_zoo["adapters"] / "plain.merged.safetensors"))
    for tensor, expected in peft.items():
        torch.testing.assert_close(ours[tensor], expected, atol=1e-6, rtol=1e-5, msg=tensor)
    assert (tmp_path / "out" / "tokenizer.json").is_file()  # the base's tokenizer


def test_lora_merge_dtype_sets_the_changed_tensors_dtype(lora_zoo):
    adapter = lora_zoo["adapters"] / "plain"
    info = load_model(f"{lora_zoo['base']}+{adapter}", lora_merge_dtype=torch.bfloat16)
    tensors = _read_all(info.source)
    target = next(iter(info.adapter.deltas))
    assert tensors[target].dtype == torch.bfloat16
    assert tensors["model.norm.weight"].dtype == torch.float32  # untouched: the base's own


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "ties"])
def test_a_recipe_with_an_adapter_matches_mergekit(lora_zoo, tmp_path, mergekit_py, method):
    base, adapter = lora_zoo["base"], lora_zoo["adapters"] / "rslora_patterns"
    params = [{"weight": 0.7}, {"weight": 0.5}]
    if method == "ties":
        params = [{"weight": 0.7, "density": 0.6}, {"weight": 0.5, "density": 0.8}]
    recipe: dict = {"merge_method": method, "dtype": "float32",
                    "models": [{"model": f"{base}+{adapter}", "parameters": params[0]},
                               {"model": str(lora_zoo["other"]), "parameters": params[1]}]}
    if method != "linear":
        recipe["base_model"] = str(base)
    config = tmp_path / "r.yml"
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert merge_yaml([str(config), str(tmp_path / "ours"), "-q"]) == 0
    mergekit_yaml = str(Path(mergekit_py).parent / "mergekit-yaml")
    proc = subprocess.run([mergekit_yaml, str(config), str(tmp_path / "theirs"), "--lora-merge-cache",
                           str(tmp_path / "cache")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours, theirs = load_checkpoint_tensors(tmp_path / "ours"), load_checkpoint_tensors(tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs)
    for tensor, expected in theirs.items():
        torch.testing.assert_close(ours[tensor], expected, atol=2e-6, rtol=2e-5, msg=tensor)


@pytest.mark.parametrize("case,words", [
    ("dora", "a DoRA adapter (use_dora: true)"),
    ("wide", "not an adapter of this base model"),
    ("no_config", "is not a LoRA adapter (no adapter_config.json)"),
    ("pickle", "no adapter_model.safetensors"),
    ("empty_part", "both parts non-empty"),
])
def test_an_unusable_adapter_is_one_line_naming_the_reference(lora_zoo, tmp_path, capsys, case, words):
    import shutil

    base, adapter = str(lora_zoo["base"]), str(lora_zoo["adapters"] / "plain")
    if case == "dora":
        adapter = str(lora_zoo["adapters"] / "dora")
    elif case == "wide":
        base = str(lora_zoo["wide"])
    elif case in ("no_config", "pickle"):
        copy = tmp_path / "adapter"
        shutil.copytree(adapter, copy)
        if case == "no_config":
            (copy / "adapter_config.json").unlink()
        else:
            (copy / "adapter_model.safetensors").rename(copy / "adapter_model.bin")
        adapter = str(copy)
    ref = f"{base}+{adapter}" if case != "empty_part" else f"{base}+"
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": ref}, {"model": base}]}))
    assert merge_yaml([str(recipe), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err, err
    assert case == "empty_part" or f"'{ref}'" in err
    assert not (tmp_path / "out").exists()
