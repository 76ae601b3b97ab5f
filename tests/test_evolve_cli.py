"""``merge-evolve`` as users run it: one-line errors, a whole run, report, resume, the exported recipe."""

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
from toy_configs import write_evolve_config

from evolve.cli import main as merge_evolve
from merge_core.cli import main as merge_yaml


def _error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert merge_evolve(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_help_is_instant_and_imports_nothing_heavy() -> None:
    probe = ("import sys, evolve.cli as c; c.build_parser('run'); "
             "print(sorted(m for m in ('torch', 'ray', 'lm_eval', 'wandb') if m in sys.modules))")
    assert subprocess.check_output([sys.executable, "-c", probe], text=True).strip() == "[]"


def test_missing_model_names_the_field(task_models, tmp_path: Path, capsys) -> None:
    config = write_evolve_config(task_models, tmp_path)
    data = yaml.safe_load(config.read_text())
    data["genome"]["models"].append(str(tmp_path / "missing"))
    config.write_text(yaml.safe_dump(data))
    err = _error([str(config), "--storage-path", str(tmp_path / "run"), "--no-ray"], capsys)
    assert err.startswith("merge-evolve: error: genome.models[2]:") and "missing" in err


def test_bad_config_field(task_models, tmp_path: Path, capsys) -> None:
    config = write_evolve_config(task_models, tmp_path, tasks=[{"name": "toy_arith", "weight": "heavy"}])
    err = _error([str(config), "--storage-path", str(tmp_path / "run")], capsys)
    assert "tasks[0].weight" in err


def test_report_on_a_directory_without_a_run(tmp_path: Path, capsys) -> None:
    err = _error(["report", "--storage-path", str(tmp_path)], capsys)
    assert "--storage-path" in err


def test_resume_without_a_run(tmp_path: Path, capsys) -> None:
    err = _error(["resume", "--storage-path", str(tmp_path / "nothing")], capsys)
    assert "no run to resume" in err


@pytest.mark.slow
def test_whole_run_report_resume_and_exported_recipe(task_models, tmp_path: Path, capsys) -> None:
    config = write_evolve_config(task_models, tmp_path)
    run = tmp_path / "run"
    argv = [str(config), "--storage-path", str(run), "--no-ray", "--max-fevals", "8",
            "--force-population-size", "4", "--random-seed", "3", "-q"]
    umask = os.umask(0o002)  # a group-shared run: every file group-readable and -writable, like any other
    try:
        assert merge_evolve(argv) == 0
    finally:
        os.umask(umask)
    out = capsys.readouterr().out
    assert out.startswith("best: train ") and "final model" in out
    modes = {str(p.relative_to(run)): oct(p.stat().st_mode & 0o777) for p in run.rglob("*") if p.is_file()}
    assert set(modes.values()) == {"0o664"} and {"report.html", "best_config.yaml", "run.json", "config.yml"} <= set(
        modes), modes

    # The same command again: the run is complete; it says so in seconds, starts no worker and
    # rewrites nothing (the final model is the best recipe's already) but the lock file, taken
    # first as by any run (its content is put back).
    lock = (run / ".lock").read_bytes()
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert merge_evolve([*argv[:-1]]) == 0  # not quiet: no preflight, worker or baseline line either
    again = capsys.readouterr()
    assert again.out.startswith("run already complete (max_fevals 8 reached; 8 candidates")
    assert "--max-fevals 12" in again.out.splitlines()[0] and "best: train " in again.out
    assert again.err == ""
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before
    assert (run / ".lock").read_bytes() == lock

    ledger = [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]
    train = [r for r in ledger if r["kind"] == "train"]
    assert len(train) == 8 and all(r["status"] == "ok" for r in train)
    assert any(r["kind"] == "held_out" for r in ledger)

    # best_config.yaml: original model references, provenance comments, merges with merge-yaml
    # to exactly the final model the run saved.
    best_text = (run / "best_config.yaml").read_text()
    assert best_text.startswith("#") and "seed: 3" in best_text
    best = yaml.safe_load(best_text)
    assert best["base_model"] == str(task_models["base"])
    assert merge_yaml([str(run / "best_config.yaml"), str(tmp_path / "remerged"), "-q"]) == 0
    ours = load_file(str(tmp_path / "remerged" / "model.safetensors"))
    final = load_file(str(run / "final_model" / "model.safetensors"))
    assert all(torch.equal(ours[k], final[k]) for k in final)

    assert merge_evolve(["report", "--storage-path", str(run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["evaluations"] + summary["cache_hits"] == 8
    assert summary["best"]["eval_id"] == max(train, key=lambda r: r["fitness"])["eval_id"]

    # Resuming with a larger budget continues the same run: old records kept, nothing re-run.
    # (seed and population size come from the stored run)
    assert merge_evolve(["resume", "--storage-path", str(run), "--no-ray", "--max-fevals", "12",
                         "-q", "--no-save-final-model"]) == 0
    again = [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]
    assert again[: len(ledger)] == ledger
    ids = [r["eval_id"] for r in again if r["kind"] != "ask"]
    assert len(ids) == len(set(ids))
    assert sorted(r["eval_id"] for r in again if r["kind"] == "ask") == sorted(
        r["eval_id"] for r in again if r["kind"] == "train")  # every asked candidate answered once
    assert len([r for r in again if r["kind"] == "train"]) == 12


@pytest.mark.slow
def test_changed_config_is_refused_on_the_same_storage(task_models, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    first = write_evolve_config(task_models, tmp_path)
    assert merge_evolve([str(first), "--storage-path", str(run), "--no-ray", "--max-fevals", "4",
                         "--force-population-size", "4", "-q", "--no-save-final-model"]) == 0
    capsys.readouterr()
    other = write_evolve_config(task_models, tmp_path, limit=5)
    err = _error([str(other), "--storage-path", str(run), "--no-ray", "--max-fevals", "4",
                  "--force-population-size", "4", "-q"], capsys)
    assert "limit" in err
