"""merge-evolve and merged vocabularies: ``genome.tokenizer_source: union`` over models of one
tokenizer (the evaluated model's own vocabulary) and over models whose vocabularies differ (a chat
fine-tune with added tokens: the workers evaluate in the merged vocabulary).  With vLLM:
tests/test_vllm_evaluator.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lm_eval")

from evolve.cli import main as merge_evolve  # noqa: E402
from tiny_models import with_added_tokens  # noqa: E402


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
    return with_added_tokens(src, dst, ["<|im_start|>", "<|im_end|>"], special=True)


@pytest.mark.slow
def test_a_union_of_one_tokenizer_runs_and_is_exported(task_models, tmp_path):
    config = _config(tmp_path / "c.yml", [str(task_models["e1"]), str(task_models["e2"])], str(task_models["base"]))
    assert merge_evolve(_argv(config, tmp_path / "run")) == 0
    assert "tokenizer_source: union" in (tmp_path / "run" / "best_config.yaml").read_text()


@pytest.mark.slow
def test_models_of_other_vocabularies_are_evolved_in_the_merged_one(task_models, tmp_path, capsys):
    from safetensors.torch import load_file as load
    from transformers import AutoTokenizer

    chat = _with_chat_tokens(task_models["e2"], tmp_path / "chat")
    config = _config(tmp_path / "c.yml", [str(task_models["e1"]), str(chat)], str(task_models["base"]))
    store = tmp_path / "run"
    argv = [a for a in _argv(config, store) if a not in ("--no-save-final-model", "--no-baselines")]
    assert merge_evolve(argv) == 0
    records = [json.loads(line) for line in (store / "evaluations.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    assert len(train) == 4 and all(r["status"] == "ok" for r in train), [r.get("reason") for r in train]
    assert all(r["status"] == "ok" for r in records if r.get("kind") == "baseline")  # parents in that vocabulary
    final = store / "final_model"
    rows = json.loads((task_models["base"] / "config.json").read_text())["vocab_size"] + 2
    assert json.loads((final / "config.json").read_text())["vocab_size"] == rows
    assert load(str(final / "model.safetensors"))["model.embed_tokens.weight"].shape[0] == rows
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(final).get_vocab()


@pytest.mark.slow
def test_the_readme_example_chat_fine_tunes_and_a_lora_evolved_together(task_models, tmp_path):
    """The README's worked example: a chat fine-tune with added tokens, one without, and a LoRA
    adapter of the base, evolved with a merged vocabulary; its best recipe merges with merge-yaml."""
    from test_lora_evolve import write_adapter

    from merge_core.cli import main as merge_yaml

    chat = _with_chat_tokens(task_models["e2"], tmp_path / "chat")
    adapter = write_adapter(task_models["base"], tmp_path / "adapter", seed=3)
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump({
        "genome": {"models": [str(chat), str(task_models["e1"]), f"{task_models['base']}+{adapter}"],
                   "merge_method": "ties", "base_model": str(task_models["base"]), "layer_granularity": 2,
                   "tokenizer": {"source": "union", "tokens": {"<|im_start|>": {"source": str(chat)}}}},
        "tasks": [{"name": "toy_arith"}], "limit": 8, "apply_chat_template": False}))
    store = tmp_path / "run"
    assert merge_evolve([str(config), "--storage-path", str(store), "--no-ray", "-q", "--max-fevals", "6",
                         "--force-population-size", "3", "--no-save-final-model"]) == 0
    records = [json.loads(line) for line in (store / "evaluations.jsonl").read_text().splitlines()]
    parents = {r["model"]: r for r in records if r.get("kind") == "baseline" and r.get("role") in ("base", "model")}
    assert f"{task_models['base']}+{adapter}" in parents  # scored in its own vocabulary (the base's)
    assert all(r["status"] == "ok" for r in parents.values()), [r.get("reason") for r in parents.values()]
    best = yaml.safe_load((store / "best_config.yaml").read_text())
    assert best["tokenizer"]["source"] == "union" and f"+{adapter}" in json.dumps(best)
    assert merge_yaml([str(store / "best_config.yaml"), str(tmp_path / "merged"), "-q"]) == 0
    merged = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged["vocab_size"] == json.loads((chat / "config.json").read_text())["vocab_size"]


def test_genome_tokenizer_section_is_checked_like_a_recipes(task_models, tmp_path, capsys):
    data = yaml.safe_load(_config(tmp_path / "c.yml", [str(task_models["e1"])], str(task_models["base"])).read_text())
    data["genome"]["tokenizer"] = {"source": "union"}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(data))
    assert merge_evolve(_argv(tmp_path / "c.yml", tmp_path / "run")) == 2
    assert "genome.tokenizer: give either tokenizer_source or tokenizer, not both" in capsys.readouterr().err
    del data["genome"]["tokenizer_source"]
    data["genome"]["tokenizer"] = {"source": "union", "pad_to_multiple_of": "eight"}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(data))
    assert merge_evolve(_argv(tmp_path / "c.yml", tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("merge-evolve: error: genome.tokenizer.pad_to_multiple_of:") and len(err.splitlines()) == 1, err
