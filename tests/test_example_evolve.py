"""The users' mergekit-evolve config (``shared/examples/evolve/evol_merge_config.yml``) runs
unchanged: its hub model names resolve to tiny stand-ins planted in a temporary HF cache, its
tasks (``spartqa_train``, ``alpaca_prompt_format``) read prepared rows from
``$MERGE_EVOLVE_HUB_DATA``, and the exported recipe names the original hub models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_model_ref import plant_in_hf_cache

from evolve.cli import main as merge_evolve
from tiny_models import make_tiny_llama, write_bpe_tokenizer

EXAMPLE = Path(__file__).parent / "data/shared_examples/evolve/evol_merge_config.yml"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

SPARTQA = [
    {"story": f"The {a} is {rel} the {b}.", "question": f"Where is the {a} relative to the {b}?",
     "candidate_answers": ["left", "right", "above", "below"], "answer": i % 4}
    for i, (a, b, rel) in enumerate([("box", "cup", "left of"), ("pen", "book", "right of"),
                                     ("lamp", "desk", "above"), ("ball", "chair", "below"),
                                     ("cat", "mat", "left of"), ("key", "door", "above")])
]
ALPACA = [{"instruction": q, "input": "", "output": a, "text": f"{q} {a}"} for q, a in [
    ("Name a color.", "Blue."), ("Say hello.", "Hello!"), ("Add 2 and 3.", "5"),
    ("Name a fruit.", "An apple."), ("Give a greeting.", "Good morning."), ("Count to three.", "1, 2, 3.")]]


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A HF cache with a tiny 8-layer Llama under every model name the example config uses,
    and the prepared hub task rows."""
    root = tmp_path_factory.mktemp("example_evolve")
    config = yaml.safe_load(EXAMPLE.read_text())
    names = [*config["genome"]["models"], config["genome"]["base_model"]]
    corpus = [json.dumps(r) for r in SPARTQA + ALPACA] + ["<|im_start|> <|im_end|> ### Instruction: USER:"]
    for seed, name in enumerate(names):
        src = make_tiny_llama(root / "src" / f"m{seed}", seed=30 + seed, tokenizer=False, vocab_size=300,
                              num_hidden_layers=8)
        write_bpe_tokenizer(src, 300, corpus)
        tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
        tok_cfg["chat_template"] = CHATML  # like the tutorial's chat models; the config applies it
        (src / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
        plant_in_hf_cache(root / "hub", name, src)
    data = root / "hub_data"
    data.mkdir()
    (data / "spartqa_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SPARTQA))
    (data / "alpaca_gpt4_500.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
    return {"cache": root / "hub", "data": data}


def test_example_config_runs_unchanged(planted: dict[str, Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(planted["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MERGE_EVOLVE_HUB_DATA", str(planted["data"]))
    monkeypatch.chdir(tmp_path)  # no local folder may shadow a hub name
    run = tmp_path / "evol_merge_storage"
    # The tutorial's command line, minus --vllm and --task-search-path (its private datasets), and
    # minus --merge-cuda where there is no GPU (there it is an error: tests/test_cli_flags.py).
    import torch

    cuda = ["--merge-cuda"] if torch.cuda.is_available() else []
    argv = [str(EXAMPLE), "--storage-path", str(run), "--in-memory", *cuda, "--no-ray", "-q",
            "--max-fevals", "4", "--force-population-size", "4", "--random-seed", "1", "--no-save-final-model"]
    assert merge_evolve(argv) == 0, capsys.readouterr().err
    ledger = [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]
    train = [r for r in ledger if r["kind"] == "train"]
    assert len(train) == 4 and all(r["status"] == "ok" for r in train), train
    assert all(set(r["scores"]) == {"alpaca_prompt_format", "spartqa_train"} for r in train)
    best = yaml.safe_load((run / "best_config.yaml").read_text())
    assert best["base_model"] == "mistralai/Mistral-7B-v0.1"
    merged = {src["model"] for sl in best["slices"] for src in sl["sources"]}
    assert merged == {"NousResearch/Hermes-2-Pro-Mistral-7B",
                      "PocketDoc/Dans-AdventurousWinds-Mk2-7b",
                      "HuggingFaceH4/zephyr-7b-beta", "mistralai/Mistral-7B-v0.1"}
    assert best["merge_method"] == "task_arithmetic"
