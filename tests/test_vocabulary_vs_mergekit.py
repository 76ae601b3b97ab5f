"""Merging models whose tokenizers differ (``tokenizer_source`` / ``tokenizer:``), against
mergekit-yaml 0.1.5: added chat tokens (more rows), a renumbered tokenizer of the same size, padding
rows past the tokenizer, ``tokens:`` sources and ``force``, ``pad_to_multiple_of``.  The merged
tensors, the written tokenizer's vocabulary and ``vocab_size`` must be mergekit's (float32)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merge_core.cli import main as merge_yaml
from tiny_models import load_checkpoint_tensors, make_tiny_llama

pytestmark = pytest.mark.mergekit


def _with_rows(path: Path, rows: int, seed: int) -> None:
    """Give the checkpoint at ``path`` ``rows`` token rows (new rows random), config to match."""
    weights = load_file(str(path / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        old = weights[name]
        extra = torch.randn(rows - old.shape[0], old.shape[1], generator=gen) * 0.05
        weights[name] = torch.cat([old, extra]) if rows > old.shape[0] else old[:rows].clone()
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = rows
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def vocab_zoo(tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("vocab")
    base = make_tiny_llama(root / "base", seed=0)
    chat = make_tiny_llama(root / "chat", seed=1)  # two added special tokens, two more rows
    tok = AutoTokenizer.from_pretrained(chat)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(chat)
    _with_rows(chat, 98, seed=1)
    renumbered = make_tiny_llama(root / "renumbered", seed=2)  # same size, w0 and w1 swapped
    data = json.loads((renumbered / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["w0"], vocab["w1"] = vocab["w1"], vocab["w0"]
    (renumbered / "tokenizer.json").write_text(json.dumps(data))
    padded = make_tiny_llama(root / "padded", seed=3)  # 8 padding rows no token names
    _with_rows(padded, 104, seed=3)
    extra = make_tiny_llama(root / "extra", seed=4)  # an ordinary new word
    tok = AutoTokenizer.from_pretrained(extra)
    tok.add_tokens(["w_new"])
    tok.save_pretrained(extra)
    _with_rows(extra, 97, seed=4)
    return {"base": base, "chat": chat, "renumbered": renumbered, "padded": padded, "extra": extra}


def _entries(zoo: dict[str, Path], names: list[str], params: list[dict]) -> list[dict]:
    return [{"model": str(zoo[n]), "parameters": p} for n, p in zip(names, params)]


def _cases(zoo: dict[str, Path]) -> dict[str, dict]:
    w = [{"weight": 0.6}, {"weight": 0.4}, {"weight": 0.3}]
    return {
        # A base model names the union's starting tokenizer: without one mergekit takes the first
        # of a set of models (an order that changes from run to run), ours the first in the recipe.
        "linear-union-added-and-renumbered": {
            "merge_method": "linear", "tokenizer_source": "union", "base_model": str(zoo["base"]),
            "models": _entries(zoo, ["base", "chat", "renumbered"], w)},
        "task_arithmetic-union-chat-and-padding": {
            "merge_method": "task_arithmetic", "base_model": str(zoo["base"]), "tokenizer_source": "union",
            "models": _entries(zoo, ["chat", "padded"], w)},
        "ties-tokens-and-pad": {
            "merge_method": "ties", "base_model": str(zoo["base"]),
            "tokenizer": {"source": "union", "pad_to_multiple_of": 8,
                          "tokens": {"<|im_start|>": {"source": str(zoo["chat"])},
                                     "w5": {"source": {"kind": "zero"}, "force": True},
                                     "<|im_end|>": {"source": {"kind": "model_token", "model": str(zoo["base"]),
                                                               "token": "</s>"}}}},
            "models": _entries(zoo, ["chat", "renumbered"], [{"weight": 0.7, "density": 0.6},
                                                             {"weight": 0.5, "density": 0.8}])},
        "slerp-base-vocabulary": {
            "merge_method": "slerp", "base_model": str(zoo["base"]), "tokenizer_source": "base",
            "parameters": {"t": 0.3}, "models": [{"model": str(zoo["base"])}, {"model": str(zoo["chat"])}]},
        "linear-a-models-vocabulary": {
            "merge_method": "linear", "tokenizer_source": str(zoo["extra"]),
            "models": _entries(zoo, ["extra", "renumbered"], w)},
    }


CASE_NAMES = ["linear-union-added-and-renumbered", "task_arithmetic-union-chat-and-padding", "ties-tokens-and-pad",
              "slerp-base-vocabulary", "linear-a-models-vocabulary"]


@pytest.fixture(scope="module")
def mergekit_outputs(vocab_zoo, mergekit_py, tmp_path_factory) -> dict[str, Path]:
    """mergekit-yaml's merge of every case, in one oracle process (its import costs seconds)."""
    root = tmp_path_factory.mktemp("mk_vocab")
    jobs = []
    for name, recipe in _cases(vocab_zoo).items():
        config = root / f"{name}.yml"
        config.write_text(yaml.safe_dump({**recipe, "dtype": "float32"}, sort_keys=False))
        jobs.append((str(config), str(root / name)))
    script = ("import sys, json, yaml\nfrom mergekit.config import MergeConfiguration\n"
              "from mergekit.merge import MergeOptions, run_merge\n"
              "for config, out in json.loads(sys.argv[1]):\n"
              "    run_merge(MergeConfiguration.model_validate(yaml.safe_load(open(config))), out,\n"
              "              options=MergeOptions(copy_tokenizer=True))\n")
    proc = subprocess.run([mergekit_py, "-c", script, json.dumps(jobs)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: root / name for name in _cases(vocab_zoo)}


@pytest.mark.parametrize("case", CASE_NAMES)
def test_merged_vocabularies_match_mergekit(vocab_zoo, mergekit_outputs, tmp_path, case):
    from transformers import AutoTokenizer

    recipe = _cases(vocab_zoo)[case]
    config = tmp_path / "r.yml"
    config.write_text(yaml.safe_dump({**recipe, "dtype": "float32"}, sort_keys=False))
    ours_dir, theirs_dir = tmp_path / "ours", mergekit_outputs[case]
    assert merge_yaml([str(config), str(ours_dir), "-q"]) == 0
    ours, theirs = load_checkpoint_tensors(ours_dir), load_checkpoint_tensors(theirs_dir)
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        assert ours[name].shape == expected.shape, name
        torch.testing.assert_close(ours[name], expected, atol=2e-6, rtol=2e-5, msg=name)
    assert AutoTokenizer.from_pretrained(ours_dir).get_vocab() == AutoTokenizer.from_pretrained(theirs_dir).get_vocab()
    ours_config = json.loads((ours_dir / "config.json").read_text())
    assert ours_config["vocab_size"] == json.loads((theirs_dir / "config.json").read_text())["vocab_size"]
    assert ours_config["vocab_size"] == ours["model.embed_tokens.weight"].shape[0]


def test_the_merged_model_loads_and_reads_its_new_tokens(vocab_zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = tmp_path / "r.yml"
    config.write_text(yaml.safe_dump({**_cases(vocab_zoo)["task_arithmetic-union-chat-and-padding"],
                                      "dtype": "float32"}, sort_keys=False))
    assert merge_yaml([str(config), str(tmp_path / "out"), "-q"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tok("<|im_start|> w3 w4 <|im_end|>", return_tensors="pt").input_ids
    assert ids.max().item() >= 96  # the chat tokens have their own ids
    assert torch.isfinite(model(ids).logits).all()


def test_different_vocabularies_without_a_tokenizer_source_say_how(vocab_zoo, tmp_path, capsys):
    config = tmp_path / "r.yml"
    config.write_text(yaml.safe_dump({"merge_method": "linear",
                                      "models": _entries(vocab_zoo, ["base", "chat"], [{"weight": 1}, {"weight": 1}])}))
    assert merge_yaml([str(config), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer_source: union" in err and len(err.strip().splitlines()) == 1
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
