"""merge-evolve and merged vocabularies: ``genome.tokenizer_source: union`` over models of one
tokenizer runs (the vocabulary is the evaluated model's own); over models whose vocabularies differ
it is refused in one line before anything starts (the workers evaluate in one model's vocabulary)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

pytest.importorskip("lm_eval")

from evolve.cli import main as merge_evolve  # noqa: E402


def _config(path: Path, models: list[str], base: str) -> Path:
    path.write_text(yaml.safe_dump({
        "genome": {"models": models, "merge_method": "task_arithmetic", "base_model": base,
                   "layer_granularity": 2, "tokenizer_source": "union"},
        "tasks": [{"name": "toy_arith"}], "limit": 8, "apply_chat_template": False}))
    return path


def _argv(config: Path, store: Path) -> list[str]:
    return [str(config), "--storage-path", str(store), "--no-ray", "-q", "--max-fevals", "4",
            "--force-population-size", "4", "--no-save-final-model", "--no-baselines"]


def _with_chat_tokens(src: Path, dst: Path) -> Path:
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(dst)
    weights = load_file(str(dst / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name] = torch.cat([weights[name], weights[name][:2].clone()])
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["vocab_size"] += 2
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.slow
def test_a_union_of_one_tokenizer_runs_and_is_exported(task_models, tmp_path):
    config = _config(tmp_path / "c.yml", [str(task_models["e1"]), str(task_models["e2"])], str(task_models["base"]))
    assert merge_evolve(_argv(config, tmp_path / "run")) == 0
    assert "tokenizer_source: union" in (tmp_path / "run" / "best_config.yaml").read_text()


def test_a_merged_vocabulary_is_refused_before_anything_starts(task_models, tmp_path, capsys):
    chat = _with_chat_tokens(task_models["e2"], tmp_path / "chat")
    config = _config(tmp_path / "c.yml", [str(task_models["e1"]), str(chat)], str(task_models["base"]))
    assert merge_evolve(_argv(config, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "genome.tokenizer_source: the models' merged vocabulary" in err, err
    assert not (tmp_path / "run").exists()
