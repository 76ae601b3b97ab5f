"""A run that merges vocabularies scores each parent with its own tokenizer and vocabulary.

The chat parent adds tokens ("4=", "0=", ...) that the toy arithmetic questions contain: the
merged (union) tokenizer cuts every question at them, a row the base never had.  The base's
baseline (a passthrough recipe naming no tokenizer) must score what the base itself scores;
scored in the merged vocabulary it scores otherwise (the control, so the test can fail).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("lm_eval")

from evolve.config import parse_evolve_config  # noqa: E402
from evolve.evaluation import EvalSettings, evaluator_class  # noqa: E402
from evolve.genome import Genome  # noqa: E402
from evolve.preflight import model_recipe  # noqa: E402
from evolve.search import TRAIN  # noqa: E402
from evolve.workers import CandidateWorker, WorkerSpec  # noqa: E402
from tiny_models import with_added_tokens  # noqa: E402


def _with_added_tokens(src: Path, dst: Path) -> Path:
    """``src`` plus added tokens "0=" .. "9=" (those its tokenizer does not have)."""
    from transformers import AutoTokenizer

    have = AutoTokenizer.from_pretrained(src).get_vocab()
    new = [f"{d}=" for d in range(10) if f"{d}=" not in have]
    assert len(new) >= 5, new
    return with_added_tokens(src, dst, new)


@pytest.fixture(scope="module")
def union_run(task_models, tmp_path_factory):
    chat = _with_added_tokens(task_models["e2"], tmp_path_factory.mktemp("own") / "chat")
    config = parse_evolve_config({
        "genome": {"models": [str(task_models["e1"]), str(chat)], "merge_method": "task_arithmetic",
                   "base_model": str(task_models["base"]), "layer_granularity": 2, "tokenizer_source": "union"},
        "tasks": [{"name": "toy_arith"}], "limit": 12, "apply_chat_template": False})
    genome = Genome(config.genome, 4)
    settings = EvalSettings.from_config(config, device="cpu", builtin_tasks=False, batch_size=8, seed=7)
    spec = WorkerSpec(template_recipe=genome.decode(genome.initial_point(False, np.random.default_rng(0))),
                      settings=settings, train_tasks=list(config.tasks), threads=1)
    worker = CandidateWorker(spec)
    yield worker, config, settings, chat
    worker.close()


def _own_scores(model: Path, config, settings) -> dict:
    evaluator = evaluator_class("hf")(model, settings, threads=1)
    try:
        scored = evaluator.evaluate(list(config.tasks))
        assert scored.error is None
        return dict(scored.scores)
    finally:
        evaluator.close()


@pytest.mark.slow
def test_a_parents_baseline_is_scored_with_its_own_tokenizer(union_run, task_models):
    worker, config, settings, chat = union_run
    assert worker.scratch is not None  # the worker's model has the merged (larger) vocabulary
    # The chat model's vocabulary is the union (its own model serves); the base's is not.
    for ref, side in ((chat, False), (task_models["base"], True), (task_models["e1"], True)):
        recipe = model_recipe(str(ref), 4, "float32")
        result = worker.run(f"baseline/{ref.name}", recipe, TRAIN)
        assert result.status == "ok", result.reason
        assert result.scores == _own_scores(ref, config, settings), ref.name
        assert (worker.own_vocabulary.held is not None) == side, ref.name
    # The side model is released once a candidate (a recipe naming the vocabulary) comes.
    assert worker.own_vocabulary.held is not None
    candidate = worker.run("c0", dict(worker.spec.template_recipe), TRAIN)
    assert candidate.status == "ok", candidate.reason
    assert worker.own_vocabulary.held is None


@pytest.mark.slow
def test_a_lora_parent_is_scored_as_its_merged_model(union_run, task_models, tmp_path):
    """``base+adapter`` (the base's vocabulary): scored like the folder merge-yaml writes for it."""
    from test_lora_evolve import write_adapter

    from merge_core.cli import main as merge_yaml

    worker, config, settings, _ = union_run
    ref = f"{task_models['base']}+{write_adapter(task_models['base'], tmp_path / 'adapter', seed=5)}"
    recipe = model_recipe(ref, 4, "float32")
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    assert merge_yaml([str(tmp_path / "r.yml"), str(tmp_path / "merged"), "-q"]) == 0
    result = worker.run("baseline/lora", recipe, TRAIN)
    assert result.status == "ok", result.reason
    assert worker.own_vocabulary.held is not None
    assert result.scores == _own_scores(tmp_path / "merged", config, settings)
    assert result.scores != _own_scores(task_models["base"], config, settings)  # the adapter counts


@pytest.mark.slow
def test_scored_in_the_merged_vocabulary_the_base_would_score_otherwise(union_run, task_models):
    """The control: the same passthrough in the run's merged vocabulary (a recipe that names it)."""
    worker, config, settings, _ = union_run
    recipe = {**model_recipe(str(task_models["base"]), 4, "float32"), "tokenizer_source": "union"}
    merged = worker.run("merged-base", recipe, TRAIN)
    assert merged.status == "ok", merged.reason
    own = worker.run("own-base", model_recipe(str(task_models["base"]), 4, "float32"), TRAIN)
    assert merged.scores != own.scores


def _union_run(task_models, tmp_path: Path, store: Path) -> list[dict]:
    """A 3-candidate union run of base, e1 and e2 with added tokens (baselines on); its ledger."""
    from evolve.cli import main as merge_evolve

    chat = _with_added_tokens(task_models["e2"], tmp_path / "chat")
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump({
        "genome": {"models": [str(task_models["e1"]), str(chat)], "merge_method": "task_arithmetic",
                   "base_model": str(task_models["base"]), "layer_granularity": 2, "tokenizer_source": "union"},
        "tasks": [{"name": "toy_arith"}], "limit": 8, "apply_chat_template": False}))
    assert merge_evolve([str(config), "--storage-path", str(store), "--no-ray", "-q", "--max-fevals", "3",
                         "--force-population-size", "3", "--no-save-final-model"]) == 0
    return [json.loads(line) for line in (store / "evaluations.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_preflight_scores_as_candidates_are_scored_and_the_baseline_in_its_own_vocabulary(
        task_models, tmp_path):
    records = _union_run(task_models, tmp_path, tmp_path / "run")
    base = next(r for r in records if r.get("kind") == "baseline" and r.get("role") == "base"
                and r["task_set"] == TRAIN)
    assert "wall_s" in base["timings"]  # scored for itself, not the preflight's (merged-vocabulary) result
    config = parse_evolve_config(yaml.safe_load((tmp_path / "c.yml").read_text()))
    settings = EvalSettings.from_config(config, device="cpu", builtin_tasks=False)
    assert base["scores"] == _own_scores(task_models["base"], config, settings)


@pytest.mark.slow
def test_a_parent_whose_own_model_does_not_fit_is_scored_in_the_merged_vocabulary_and_noted(
        task_models, tmp_path, monkeypatch, capsys):
    """Out of memory loading a parent's own model (a GPU full with the worker's inputs): the
    parent is scored in the run's vocabulary instead, and the ledger and report say so."""
    from evolve.workers import own_vocabulary
    from evolve.workers.worker import OWN_VOCABULARY_FALLBACK

    def no_room(self, model_dir):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 14.00 GiB")

    monkeypatch.setattr(own_vocabulary.OwnVocabularyScorer, "_evaluator", no_room)
    store = tmp_path / "run"
    records = _union_run(task_models, tmp_path, store)
    parents = {r["name"]: r for r in records if r.get("kind") == "baseline" and r.get("role") in ("base", "model")}
    assert all(r["status"] == "ok" for r in parents.values())
    # base and e1 lack the chat tokens: noted; the chat model's vocabulary is the union: as usual
    assert parents["base"]["note"] == parents["e1"]["note"] == OWN_VOCABULARY_FALLBACK
    assert "note" not in parents["chat"]
    from evolve.report import report

    capsys.readouterr()
    assert report(store) == 0
    assert f"({OWN_VOCABULARY_FALLBACK})" in capsys.readouterr().out
    from evolve.html_report import build_report

    page = build_report(store, live=False)
    assert OWN_VOCABULARY_FALLBACK in page[page.index('data-table="baselines"'):]
