"""``merge-yaml`` end to end: outputs that transformers loads, and bad input handled cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merge_core.cli import main as merge_yaml
from tiny_models import make_tiny_llama


def _write(tmp_path: Path, recipe: dict | str) -> Path:
    path = tmp_path / "recipe.yml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


def _ta_recipe(models: dict[str, Path], **extra: object) -> dict:
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models["a"]), "parameters": {"weight": 0.5}},
            {"model": str(models["b"]), "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    }
    recipe.update(extra)
    return recipe


def _run_bad(tmp_path: Path, recipe: dict | str, capsys: pytest.CaptureFixture) -> str:
    out = tmp_path / "out"
    code = merge_yaml([str(_write(tmp_path, recipe)), str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert not out.exists(), "a failed merge must write nothing"
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert not leftovers, f"temp dirs left behind: {leftovers}"
    return err


def test_task_arithmetic_output_loads_and_is_right(tiny_models, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert merge_yaml([str(_write(tmp_path, _ta_recipe(tiny_models))), str(out), "--quiet"]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    base = load_file(str(tiny_models["base"] / "model.safetensors"))
    a = load_file(str(tiny_models["a"] / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    b = {}
    for f in tiny_models["b"].glob("*.safetensors"):
        b.update(load_file(str(f)))
    expected = base[name] + 0.5 * (a[name] - base[name]) + 0.5 * (b[name] - base[name])
    torch.testing.assert_close(model.state_dict()[name], expected)
    for extra in ("mergekit_config.yml", "README.md", "config.json", "tokenizer.json"):
        assert (out / extra).exists(), extra
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["merge_method"] == "task_arithmetic"


def test_sharded_output_and_out_dtype(tiny_models, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    recipe = _ta_recipe(tiny_models, out_dtype="bfloat16")
    assert merge_yaml([str(_write(tmp_path, recipe)), str(out), "--out-shard-size", "20K", "-q"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert all((out / s).exists() for s in shards)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tensors = load_file(str(out / shards[0]))
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())


def test_merge_yaml_console_script_help_is_fast() -> None:
    proc = subprocess.run([sys.executable, "-m", "merge_core.cli", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--out-shard-size" in proc.stdout
    # Heavy imports stay lazy: --help must not import torch.
    probe = "import sys, merge_core.cli; merge_core.cli.build_parser(); print('torch' in sys.modules)"
    assert subprocess.check_output([sys.executable, "-c", probe], text=True).strip() == "False"


def test_missing_model_dir(tiny_models, tmp_path: Path, capsys) -> None:
    recipe = _ta_recipe(tiny_models)
    recipe["models"][1]["model"] = str(tmp_path / "nope")
    err = _run_bad(tmp_path, recipe, capsys)
    assert "nope" in err


def test_unknown_method(tiny_models, tmp_path: Path, capsys) -> None:
    err = _run_bad(tmp_path, _ta_recipe(tiny_models, merge_method="frobnicate"), capsys)
    assert "merge_method" in err and "frobnicate" in err


def test_unknown_parameter(tiny_models, tmp_path: Path, capsys) -> None:
    recipe = _ta_recipe(tiny_models)
    recipe["models"][0]["parameters"]["wieght"] = 0.3
    err = _run_bad(tmp_path, recipe, capsys)
    assert "wieght" in err and "models[0]" in err


def test_layer_range_out_of_bounds(tiny_models, tmp_path: Path, capsys) -> None:
    recipe = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(tiny_models["a"]), "layer_range": [0, 40]}]}],
    }
    err = _run_bad(tmp_path, recipe, capsys)
    assert err.count("slices[0].sources[0].layer_range") == 1 and "40" in err


def test_shape_mismatch(tiny_models, tmp_path: Path, capsys) -> None:
    wide = make_tiny_llama(tmp_path / "wide", seed=5, intermediate_size=80)
    recipe = _ta_recipe(tiny_models)
    recipe["models"][1]["model"] = str(wide)
    err = _run_bad(tmp_path, recipe, capsys)
    assert "shape" in err.lower() and "mlp" in err


def test_vocab_size_mismatch(tiny_models, tmp_path: Path, capsys) -> None:
    big_vocab = make_tiny_llama(tmp_path / "bigvocab", seed=6, vocab_size=128)
    recipe = _ta_recipe(tiny_models)
    recipe["models"][0]["model"] = str(big_vocab)
    err = _run_bad(tmp_path, recipe, capsys)
    assert "vocab" in err.lower()


def test_corrupt_safetensors_header(tiny_models, tmp_path: Path, capsys) -> None:
    broken = make_tiny_llama(tmp_path / "broken", seed=7)
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"{not json at all, just garbage!!"
    weights.write_bytes(bytes(data))
    recipe = _ta_recipe(tiny_models)
    recipe["models"][0]["model"] = str(broken)
    err = _run_bad(tmp_path, recipe, capsys)
    assert "model.safetensors" in err


def test_pickle_checkpoint_refused(tiny_models, tmp_path: Path, capsys) -> None:
    pickled = make_tiny_llama(tmp_path / "pickled", seed=8)
    os.remove(pickled / "model.safetensors")
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    recipe = _ta_recipe(tiny_models)
    recipe["models"][0]["model"] = str(pickled)
    err = _run_bad(tmp_path, recipe, capsys)
    assert "pickle" in err.lower() or ".bin" in err


def test_yaml_syntax_error(tmp_path: Path, capsys) -> None:
    err = _run_bad(tmp_path, "models: [\n  - model: x\n merge_method: linear", capsys)
    assert "recipe.yml" in err


def test_slerp_base_not_merged(tiny_models, tmp_path: Path, capsys) -> None:
    recipe = {
        "merge_method": "slerp",
        "base_model": str(tiny_models["base"]),
        "parameters": {"t": 0.5},
        "models": [{"model": str(tiny_models["a"])}, {"model": str(tiny_models["b"])}],
    }
    err = _run_bad(tmp_path, recipe, capsys)
    assert "base_model" in err


def test_random_seed_reproducible(tiny_models, tmp_path: Path) -> None:
    recipe = {
        "merge_method": "dare_ties",
        "base_model": str(tiny_models["base"]),
        "models": [{"model": str(tiny_models[n]), "parameters": {"weight": 0.5, "density": 0.5}}
                   for n in ("a", "b")],
        "dtype": "float32",
    }
    path = _write(tmp_path, recipe)
    runs = {}
    for label, seed in (("s1", "7"), ("s2", "7"), ("s3", "8")):
        assert merge_yaml([str(path), str(tmp_path / label), "--random-seed", seed, "-q"]) == 0
        runs[label] = load_file(str(tmp_path / label / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(runs["s1"][name], runs["s2"][name])
    assert not torch.equal(runs["s1"][name], runs["s3"][name])


@pytest.mark.parametrize("flag", [None, "--fsync"])
def test_fsync_is_opt_in(flag, tiny_models, tmp_path: Path, monkeypatch) -> None:
    """By default the output is renamed into place without waiting for the disk (as mergekit
    and transformers write); ``--fsync`` flushes every written file and the directories first,
    and only then hints early writeback."""
    import merge_core.safetensors_writer as safetensors_writer
    import merge_core.writer as writer

    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(writer.os, "fsync", spy)
    hints = []
    monkeypatch.setattr(safetensors_writer, "_load_sync_file_range", lambda: lambda *a: hints.append(a) or 0)
    out = tmp_path / "merged"
    args = [str(_write(tmp_path, _ta_recipe(tiny_models))), str(out), "--quiet"] + ([flag] if flag else [])
    assert merge_yaml(args) == 0
    assert (out / "model.safetensors").exists()
    if flag is None:
        assert synced == [] and hints == []
    else:
        assert any(p.endswith("model.safetensors") for p in synced) and hints
        assert str(tmp_path) in synced  # the parent directory, after the rename
