"""Baselines (evolve.baselines): the input models and the equal merge scored once per run, reused
on resume, and the best's gain over the best parent in the progress line, provenance and report."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from toy_configs import write_evolve_config

from evolve.baselines import (
    BASELINE,
    EQUAL_MERGE,
    baseline_jobs,
    baseline_provenance,
    baseline_records,
    baseline_summary,
    best_parent,
    short_name,
)
from evolve.cli import build_parser, run_options
from evolve.cli import main as merge_evolve
from evolve.config import parse_evolve_config
from evolve.genome import Genome
from evolve.observers.progress import ProgressObserver
from evolve.preflight import check_models, model_recipe
from evolve.storage import RunStorage, StorageError
from fake_pools import LastFirstPool


def _ledger(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]


def _baseline(name: str, role: str, fitness: float | None, task_set: str = "train", model: str | None = "m",
              status: str = "ok", reason: str | None = None) -> dict:
    suffix = "" if task_set == "train" else "/held_out"
    return {"eval_id": f"baseline/{name}{suffix}", "kind": BASELINE, "name": name, "model": model, "role": role,
            "task_set": task_set, "status": status, "reason": reason, "fitness": -2.0 if fitness is None else fitness,
            "scores": {"t": fitness} if fitness is not None else {}}


# -- the numbers ---------------------------------------------------------------------------


def test_short_names_of_model_references():
    assert short_name("zoo/spatial") == "spatial"
    assert short_name("org/Model-7B@main") == "Model-7B"
    assert short_name("/abs/path/model/") == "model"


def test_summary_best_parent_and_gains():
    records = [
        _baseline("base", "base", 0.2), _baseline("base", "base", 0.21, "held_out"),
        _baseline("a", "model", 0.5), _baseline("a", "model", 0.40, "held_out"),
        _baseline("b", "model", None, status="failed", reason="boom"), _baseline("b", "model", 0.45, "held_out"),
        _baseline(EQUAL_MERGE, EQUAL_MERGE, 0.9, model=None),  # not a parent, however good
        {"eval_id": "c000000", "kind": "train", "status": "ok", "fitness": 0.7},
        _baseline("a", "model", 0.55),  # a later record of the same id wins
    ]
    assert [r["eval_id"] for r in baseline_records(records)][-1] == "baseline/a"
    summary = baseline_summary(records)
    assert [e["name"] for e in summary] == ["base", "a", "b", EQUAL_MERGE]
    assert summary[2]["fitness"] is None and summary[2]["reason"] == "boom" and summary[2]["held_out_fitness"] == 0.45
    assert best_parent(summary)["name"] == "a" and best_parent(summary, "held_out_fitness")["name"] == "b"
    prov = baseline_provenance(records, 0.7, 0.5)
    assert prov["best_parent"] == "a"
    assert prov["gain_over_best_parent"] == pytest.approx(0.15)
    assert prov["held_out_gain_over_best_parent"] == pytest.approx(0.05)  # vs the best held-out parent (b)
    assert prov["baselines"][0] == {"name": "base", "model": "m", "role": "base", "train_fitness": 0.2,
                                    "held_out_fitness": 0.21}
    assert baseline_provenance([], 0.7, None) == {"baselines": [], "best_parent": None, "gain_over_best_parent": None,
                                                  "held_out_gain_over_best_parent": None}


def test_jobs_are_each_input_model_once_and_the_equal_merge(task_models, tmp_path: Path):
    config = parse_evolve_config(yaml.safe_load(write_evolve_config(task_models, tmp_path).read_text()))
    models = check_models(config, tmp_path)
    genome = Genome(config.genome, models.num_layers)
    jobs = baseline_jobs(config, models, genome)
    assert [(j.name, j.role) for j in jobs] == [("base", "base"), ("e1", "model"), ("e2", "model"),
                                                (EQUAL_MERGE, EQUAL_MERGE)]
    assert jobs[1].recipe == model_recipe(str(task_models["e1"]), models.num_layers, genome.dtype)
    x0 = genome.initial_point(False, np.random.default_rng(0))
    assert jobs[-1].recipe == genome.decode(x0) and jobs[-1].x == x0
    assert jobs[0].eval_id("train") == "baseline/base" and jobs[0].eval_id("held_out") == "baseline/base/held_out"
    # The base listed among the models too is scored once; two folders with one name get distinct names.
    twin = tmp_path / "twin" / task_models["e1"].name  # a copy: a symlink is the same model (refused)
    shutil.copytree(task_models["e1"], twin)
    data = yaml.safe_load(write_evolve_config(task_models, tmp_path).read_text())
    data["genome"]["models"] = [str(task_models["base"]), str(task_models["e1"]), str(twin)]
    config = parse_evolve_config(data)
    jobs = baseline_jobs(config, check_models(config, tmp_path), genome)
    names = [j.name for j in jobs]
    assert len(names) == len(set(names)) == 4 and names[:2] == ["base", "e1"]


def test_baseline_lines_print_in_order_whatever_order_workers_finish(task_models, tmp_path: Path, capsys):
    from evolve.baselines import score_baselines

    config = parse_evolve_config(yaml.safe_load(write_evolve_config(task_models, tmp_path).read_text()))
    models = check_models(config, tmp_path)
    genome = Genome(config.genome, models.num_layers)

    pool = LastFirstPool({"toy_arith": 0.5, "toy_prompt_format": 0.25, "toy_arith_heldout": 0.125}, num_workers=8)
    score_baselines(pool, RunStorage(tmp_path / "run"), config, models, genome, {})
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("baseline: ")]
    assert [line.split()[1] for line in lines] == ["base", "e1", "e2", EQUAL_MERGE]
    assert lines[1] == f"baseline: e1 ({task_models['e1']}) train 0.4000, held-out 0.1250"


def test_progress_line_shows_the_gain_over_the_parents():
    class Driver:
        records = {r["eval_id"]: r for r in [_baseline("a", "model", 0.5), _baseline("b", "model", 0.3)]}

        def busy_fraction(self) -> float:
            return 1.0

    log = io.StringIO()
    progress = ProgressObserver(10, stream=log)
    progress.on_start(Driver())
    progress.on_record({"eval_id": "c000000", "kind": "train", "status": "ok", "fitness": 0.62})
    assert "best 0.6200 (+0.1200 over parents)" in progress.line()


def test_wandb_gets_the_baselines_and_the_gain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("wandb")
    from evolve.observers.wandb_logger import WandbObserver

    for name, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"),
                        ("WANDB_CONFIG_DIR", str(tmp_path / "cfg")), ("WANDB_CACHE_DIR", str(tmp_path / "cache"))):
        monkeypatch.setenv(name, value)
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    config = parse_evolve_config({"genome": {"models": ["zoo/a", "zoo/b"], "base_model": "zoo/base",
                                             "merge_method": "task_arithmetic"}, "tasks": ["toy_arith"]})

    class Driver:
        genome = Genome(config.genome, 4)
        records = {r["eval_id"]: r for r in [_baseline("a", "model", 0.5), _baseline("a", "model", 0.45, "held_out"),
                                             _baseline("b", "model", 0.3)]}

    observer = WandbObserver(config, project=None, entity=None, run_dir=tmp_path, seed=0)
    try:
        observer.on_start(Driver())
        observer.on_new_best({"eval_id": "c000003", "fitness": 0.62}, {}, None)
        summary = observer.run.summary
        assert summary["best_parent"] == "a" and summary["best_parent_fitness"] == 0.5
        assert summary["baseline/a/held_out_fitness"] == 0.45 and summary["baseline/b/fitness"] == 0.3
        assert summary["best_gain_over_parents"] == pytest.approx(0.12)
    finally:
        observer.close()


def test_a_ledger_of_only_baselines_is_a_run_not_yet_started(tmp_path: Path):
    storage = RunStorage(tmp_path)
    storage.append_evaluation(_baseline("a", "model", 0.5))
    assert storage.check_resumable({"seed": 0}, ("seed",)) is None  # a new run: the search never opened it
    storage.append_evaluation({"eval_id": "c000000", "kind": "train", "status": "ok", "fitness": 0.1})
    with pytest.raises(StorageError, match="has evaluations but no run.json"):
        storage.check_resumable({"seed": 0}, ("seed",))


def test_no_baselines_flag():
    argv = ["c.yml", "--storage-path", "x"]
    assert run_options(build_parser("run").parse_args(argv)).baselines is True
    assert run_options(build_parser("run").parse_args([*argv, "--no-baselines"])).baselines is False


# -- in a real run -------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_scores_its_baselines_once_and_keeps_them_on_resume(task_models, tmp_path: Path, capsys):
    config, run = write_evolve_config(task_models, tmp_path), tmp_path / "run"
    argv = [str(config), "--storage-path", str(run), "--no-ray", "--max-fevals", "6", "--force-population-size", "3",
            "--random-seed", "1", "--no-save-final-model"]
    assert merge_evolve(argv) == 0
    err = capsys.readouterr().err
    assert "baseline: e1 (" in err and "baselines: best parent" in err and "over parents)" in err
    ledger = _ledger(run)
    baselines = [r for r in ledger if r["kind"] == BASELINE]
    assert sorted(r["eval_id"] for r in baselines) == sorted(
        f"baseline/{n}{s}" for n in ("base", "e1", "e2", EQUAL_MERGE) for s in ("", "/held_out"))
    assert all(r["status"] == "ok" for r in baselines), baselines
    # Recorded before the search: every baseline precedes the first ask.
    first_ask = next(i for i, r in enumerate(ledger) if r["kind"] == "ask")
    assert all(ledger.index(r) < first_ask for r in baselines)
    # The starting model's baseline is the preflight's result (never submitted: no wall_s), the others ran.
    by_id = {r["eval_id"]: r for r in baselines}
    assert "wall_s" not in by_id["baseline/base"]["timings"] and "wall_s" in by_id["baseline/e1"]["timings"]
    assert by_id["baseline/e1"]["model"] == str(task_models["e1"])
    for rec in baselines:
        tasks = {"train": ["toy_arith", "toy_prompt_format"], "held_out": ["toy_arith_heldout"]}[rec["task_set"]]
        assert sorted(rec["scores"]) == sorted(tasks)
        weights = {"toy_arith": 0.6, "toy_prompt_format": 0.4, "toy_arith_heldout": 1.0}
        assert rec["fitness"] == pytest.approx(sum(weights[t] * rec["scores"][t] for t in tasks))

    parents = [r["fitness"] for r in baselines if r["task_set"] == "train" and r["role"] != EQUAL_MERGE]
    provenance = json.loads((run / "best_config.provenance.json").read_text())
    assert provenance["gain_over_best_parent"] == pytest.approx(provenance["train_fitness"] - max(parents))
    assert [b["name"] for b in provenance["baselines"]] == ["base", "e1", "e2", EQUAL_MERGE]

    assert merge_evolve(["report", "--storage-path", str(run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["gain_over_best_parent"] == pytest.approx(provenance["gain_over_best_parent"])
    assert len(summary["baselines"]) == 4
    assert merge_evolve(["report", "--storage-path", str(run)]) == 0
    text = capsys.readouterr().out
    assert "baselines" in text and "best vs best parent (" in text and "equal_merge" in text

    # Resume with a larger budget: the stored baselines are reused, none is scored again.
    assert merge_evolve(["resume", "--storage-path", str(run), "--no-ray", "--max-fevals", "9", "-q",
                         "--no-save-final-model"]) == 0
    again = _ledger(run)
    assert again[: len(ledger)] == ledger
    assert [r for r in again if r["kind"] == BASELINE] == baselines
    assert sum(r["kind"] == "train" for r in again) == 9


@pytest.mark.slow
def test_no_baselines_skips_them(task_models, tmp_path: Path, capsys):
    config, run = write_evolve_config(task_models, tmp_path), tmp_path / "run"
    assert merge_evolve([str(config), "--storage-path", str(run), "--no-ray", "--max-fevals", "3",
                         "--force-population-size", "3", "-q", "--no-save-final-model", "--no-baselines"]) == 0
    assert not [r for r in _ledger(run) if r["kind"] == BASELINE]
    provenance = json.loads((run / "best_config.provenance.json").read_text())
    assert provenance["baselines"] == [] and provenance["gain_over_best_parent"] is None
