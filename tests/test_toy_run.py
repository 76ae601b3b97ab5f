"""The embedded default: ``merge-evolve configs/toy.yml`` on the toy zoo finds a merge that
combines the experts' skills (issue #4's bar), exactly as the README's main command runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TOY_CONFIG = REPO / "configs" / "toy.yml"


def _weighted(row: dict[str, float], tasks: list[dict]) -> float:
    total = sum(t.get("weight", 1.0) for t in tasks)
    return sum(t.get("weight", 1.0) * row[t["name"]] for t in tasks) / total


@pytest.mark.slow
def test_toy_config_beats_parents_and_equal_merge(toy_zoo, tmp_path: Path) -> None:
    # The config names zoo/<model> relative to the working directory, as in the README.
    (tmp_path / "zoo").symlink_to(toy_zoo.root, target_is_directory=True)
    exe = Path(sys.executable).with_name("merge-evolve")
    cmd = [str(exe), str(TOY_CONFIG), "--storage-path", "runs/toy", "--random-seed", "0", "-q",
           "--no-save-final-model"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    config = yaml.safe_load(TOY_CONFIG.read_text())
    rows = toy_zoo.matrix["rows"]
    rivals = {name: _weighted(rows[name], config["tasks"]) for name in (*toy_zoo.matrix["experts"], "base",
                                                                        "merge_ta_third")}
    run = tmp_path / "runs" / "toy"
    ledger = [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]
    train = [r for r in ledger if r["kind"] == "train" and r["status"] == "ok"]
    best = max(train, key=lambda r: r["fitness"])
    assert best["fitness"] >= max(rivals.values()) + 0.10, (best["fitness"], rivals)
    held = [r for r in ledger if r["kind"] == "held_out" and r["recipe_hash"] == best["recipe_hash"]]
    assert held, "the best candidate was not re-scored on the held-out split"
    assert abs(held[-1]["fitness"] - best["fitness"]) <= 0.05, (held[-1]["fitness"], best["fitness"])
    # The headline: the best and its gain over the best parent, on train and held-out.
    headline = next(line for line in proc.stdout.splitlines() if line.startswith("best: "))
    assert headline.startswith(f"best: train {best['fitness']:.4f}, +") and "; held-out " in headline
    exported = yaml.safe_load((run / "best_config.yaml").read_text())
    assert exported["base_model"] == "zoo/base" and exported["merge_method"] == "task_arithmetic"
