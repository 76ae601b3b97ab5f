"""A real multi-node Ray cluster on one machine: a head and two worker nodes (several raylets).

``merge-evolve ... --ray-address <cluster>`` runs the toy search across both nodes (each served
evaluations, recorded per result as ``node``); a node removed mid-run costs no evaluation: its
candidate is retried on the other node, the ledger holds every candidate once and the run ends
with its budget used exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
pytest.importorskip("lm_eval")

from ray.cluster_utils import Cluster  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUDGET = 40


def _ledger(store: Path) -> list[dict]:
    path = store / "evaluations.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


@pytest.mark.slow
def test_search_across_nodes_survives_losing_one(task_models, tmp_path):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        first = cluster.add_node(num_cpus=2)
        second = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        config = {"genome": {"models": [str(task_models["e1"]), str(task_models["e2"])],
                             "merge_method": "task_arithmetic", "base_model": str(task_models["base"]),
                             "layer_granularity": 2},
                  "tasks": ["toy_arith"], "held_out": ["toy_arith_heldout"], "limit": 16,
                  "apply_chat_template": False}
        (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
        store = tmp_path / "run"
        run = subprocess.Popen(
            [sys.executable, "-m", "evolve.cli", str(tmp_path / "c.yml"), "--storage-path", str(store),
             "--ray-address", cluster.address, "--num-workers", "2", "--max-fevals", str(BUDGET),
             "--force-population-size", "6", "--no-save-final-model", "-q"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and run.poll() is None:
            if sum(r["kind"] == "train" for r in _ledger(store)) >= 8:
                break
            time.sleep(0.2)
        before = [r for r in _ledger(store) if r["kind"] == "train"]
        assert run.poll() is None and len(before) >= 8, f"the run ended early: {run.communicate()[1][-2000:]}"
        nodes = {r["node"] for r in before}
        assert nodes == {first.node_id, second.node_id}, "both nodes should have served evaluations"
        cluster.remove_node(second)
        removed_at = len(_ledger(store))
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-3000:]
    finally:
        cluster.shutdown()
    ledger = _ledger(store)
    train = [r for r in ledger if r["kind"] == "train"]
    ids = [r["eval_id"] for r in train]
    assert len(ids) == len(set(ids)) == BUDGET, "every candidate exactly once, the budget exactly"
    assert all(r["status"] == "ok" for r in train), [r["reason"] for r in train if r["status"] != "ok"]
    later = [r for r in ledger[removed_at:] if r["kind"] == "train" and r.get("cached_from") is None]
    # After the loss only the first node runs (one result may have been on its way already).
    assert later and sum(r["node"] != first.node_id for r in later) <= 1
    retried = [r for r in train if r["timings"].get("attempts", 1) > 1]
    assert len(retried) <= 1  # at most the candidate that was running on the lost node
