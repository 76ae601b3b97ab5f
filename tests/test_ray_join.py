"""Joining a running Ray cluster as Ray's own tools do, and failing in one line when workers
cannot be placed (instead of waiting forever).

The cluster is a real one on this machine (``ray.cluster_utils.Cluster``: a head raylet on
loopback, shut down at the end); the runs are the real ``merge-evolve`` command.
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

pytest.importorskip("ray")
pytest.importorskip("lm_eval")

from ray.cluster_utils import Cluster  # noqa: E402

from evolve.workers.placement import check_feasible  # noqa: E402
from evolve.workers.worker import WorkerPoolError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CORES = os.cpu_count() or 1

BLOCKER = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
hold = ray.remote(num_cpus=float(sys.argv[2]))(type("Hold", (), {"ping": lambda self: 1}))
actor = hold.remote()
ray.get(actor.ping.remote())
print("holding", flush=True)
time.sleep(600)
"""


def test_feasibility_counts_per_node_and_names_the_short_resource() -> None:
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    check_feasible(4, 1, 0, nodes)
    check_feasible(1, 0, 1, nodes)
    with pytest.raises(WorkerPoolError, match=r"^cannot place 5 evaluation workers of 1 CPU each: .* 4 CPUs in all, "
                                              r"at most 2 on one node: room for 4; use --num-workers 4$"):
        check_feasible(5, 1, 0, nodes)
    with pytest.raises(WorkerPoolError, match=r"of 3 CPUs each: .* room for 0; no node can hold one"):
        check_feasible(1, 3, 0, nodes)  # 4 CPUs in all, but not 3 on one node
    with pytest.raises(WorkerPoolError, match=r"2 evaluation workers of 1 GPU each: .* 1 GPUs in all"):
        check_feasible(2, 0, 1, nodes)  # the dead node's GPUs do not count


def _config(models: dict[str, Path], tmp_path: Path) -> Path:
    data = {"genome": {"models": [str(models["e1"]), str(models["e2"])], "base_model": str(models["base"]),
                       "merge_method": "task_arithmetic", "layer_granularity": 2},
            "tasks": ["toy_arith"], "limit": 6, "apply_chat_template": False}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def _train(store: Path) -> list[dict]:
    ledger = [json.loads(line) for line in (store / "evaluations.jsonl").read_text().splitlines()]
    return [r for r in ledger if r["kind"] == "train"]


def _merge_evolve(config: Path, store: Path, address: str, *extra: str, timeout: float = 300,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A plain run: the cluster comes from RAY_ADDRESS (``address``; "" for none), no --ray-address."""
    argv = [sys.executable, "-m", "evolve.cli", str(config), "--storage-path", str(store), "--max-fevals", "4",
            "--force-population-size", "4", "--no-save-final-model", "--no-baselines", "-q", *extra]
    environment = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": address, **(env or {})}
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=environment)


@pytest.mark.slow
def test_plain_run_joins_the_cluster_in_ray_address_and_refuses_what_cannot_be_placed(task_models, tmp_path):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": CORES, "include_dashboard": False})
    blocker = None
    try:
        cluster.wait_for_nodes()
        config = _config(task_models, tmp_path)
        # 1. Joined through RAY_ADDRESS (Ray's convention): no resources passed to ray.init.
        ok = _merge_evolve(config, tmp_path / "joined", cluster.address)
        assert ok.returncode == 0, ok.stderr[-3000:]
        ledger = [json.loads(line) for line in (tmp_path / "joined" / "evaluations.jsonl").read_text().splitlines()]
        train = [r for r in ledger if r["kind"] == "train"]
        head = cluster.head_node.node_id
        assert len(train) == 4 and all(r["status"] == "ok" and r["node"] == head for r in train)

        # 1b. No RAY_ADDRESS either: the cluster started on this machine, as a plain ray.init()
        # finds it; --ray-address local asks for a private Ray instead.
        found = _merge_evolve(config, tmp_path / "found", "")
        assert found.returncode == 0, found.stderr[-3000:]
        assert {r["node"] for r in _train(tmp_path / "found")} == {head}
        private = _merge_evolve(config, tmp_path / "private", "", "--ray-address", "local")
        assert private.returncode == 0, private.stderr[-3000:]
        assert head not in {r["node"] for r in _train(tmp_path / "private")}

        # 2. More workers than the cluster has CPUs: one line at once, exit 2, nothing written.
        started = time.monotonic()
        bad = _merge_evolve(config, tmp_path / "too_many", cluster.address, "--num-workers", str(CORES + 1))
        assert bad.returncode == 2, bad.stderr[-3000:]
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in bad.stderr, bad.stderr
        assert lines[0].startswith(f"merge-evolve: error: cannot place {CORES + 1} evaluation workers of 1 CPU each")
        assert f"{CORES:g} CPUs in all" in lines[0] and f"use --num-workers {CORES}" in lines[0]
        assert time.monotonic() - started < 120 and not (tmp_path / "too_many").exists()

        # 3. Enough CPUs in the cluster, but held by something else: a bounded wait, then one line.
        blocker = subprocess.Popen([sys.executable, "-c", BLOCKER, cluster.address, str(CORES)],
                                   stdout=subprocess.PIPE, text=True, env={**os.environ, "RAY_ADDRESS": ""})
        assert blocker.stdout.readline().strip() == "holding"
        started = time.monotonic()
        held = _merge_evolve(config, tmp_path / "held", cluster.address, "--num-workers", "1",
                             env={"MERGE_EVOLVE_PLACEMENT_TIMEOUT": "5"})
        waited = time.monotonic() - started
        assert held.returncode == 2, held.stderr[-3000:]
        lines = held.stderr.strip().splitlines()
        assert len(lines) == 1, held.stderr
        assert "1 of 1 evaluation workers could not be placed within 5 s" in lines[0]
        assert f"each needs {CORES} CPU" in lines[0] and "has 0 CPUs available" in lines[0] and "MERGE_EVOLVE_PLACEMENT_TIMEOUT" in lines[0]
        assert waited < 90 and not (tmp_path / "held").exists()
    finally:
        if blocker is not None:
            blocker.kill()
            blocker.wait()
        cluster.shutdown()
