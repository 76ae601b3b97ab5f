"""Evaluation workers and pools on tiny models with a tokenizer that reads the toy tasks.

In process (CandidateWorker, LocalPool): merges land in the resident model exactly, failures of
one candidate (exception, NaN weights, bad recipe) leave the worker usable, slerp plans with
other model orders are renumbered.  With Ray (slow): SearchDriver end to end on two actors, and
fault isolation (crash, crash once, hang past the timeout, setup failure).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from evolve.config import parse_evolve_config  # noqa: E402
from evolve.evaluation import EvalSettings  # noqa: E402
from evolve.genome import Genome  # noqa: E402
from evolve.search import HELD_OUT, TRAIN, SearchDriver  # noqa: E402
from evolve.storage import RunStorage  # noqa: E402
from evolve.workers import CandidateWorker, LocalPool, WorkerSpec  # noqa: E402
from merge_core.in_memory import InMemoryMerger  # noqa: E402
from merge_core.planner import Planner  # noqa: E402
from merge_core.recipe import recipe_from_dict  # noqa: E402


@pytest.fixture(scope="module")
def models(task_models: dict[str, Path]) -> dict[str, Path]:
    """A base and two "experts" (random weights) with a tokenizer that reads the toy tasks."""
    return task_models



def _config(models: dict[str, Path], method: str = "task_arithmetic", **extra):
    genome = {"models": [str(models["e1"]), str(models["e2"])], "merge_method": method, "layer_granularity": 2}
    if method == "task_arithmetic":
        genome["base_model"] = str(models["base"])
    else:
        genome["models"].append(str(models["base"]))
    data = {"genome": genome, "tasks": [{"name": "toy_arith"}], "limit": 20, "apply_chat_template": False}
    return parse_evolve_config({**data, **extra})


def _spec(config, genome: Genome, **kw) -> WorkerSpec:
    template = genome.decode(genome.initial_point(False, np.random.default_rng(0)))
    settings = EvalSettings.from_config(config, device="cpu", builtin_tasks=False, batch_size=8, seed=7)
    return WorkerSpec(template_recipe=template, settings=settings,
                      train_tasks=list(config.tasks), held_out_tasks=list(config.held_out), **kw)


def _candidates(genome: Genome, n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    lo, hi = (np.asarray(b) for b in genome.bounds)
    return [genome.decode(rng.uniform(lo, hi)) for _ in range(n)]


def _fresh_merge(recipe: dict) -> dict[str, torch.Tensor]:
    """The merge as merge-yaml writes it (recipe dtype bfloat16), read back in fp32."""
    plan = Planner().plan(recipe_from_dict(recipe), seed=0)
    merged = InMemoryMerger(plan).merged_state_dict(plan)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    return {name: t.float() for name, t in merged.items()}


@pytest.fixture(scope="module")
def local(models):
    config = _config(models, held_out=[{"name": "toy_arith_heldout"}])
    genome = Genome(config.genome, 4)
    worker = CandidateWorker(_spec(config, genome, threads=1))
    yield worker, genome
    worker.close()


# -- in process ------------------------------------------------------------------------------


def test_merge_lands_in_model_and_history_does_not_leak(local):
    worker, genome = local
    a, b = _candidates(genome, 2)
    first = worker.run("a", a, TRAIN)
    assert first.status == "ok", first.reason
    assert set(first.scores) == {"toy_arith"} and 0.0 <= first.scores["toy_arith"] <= 1.0
    assert set(first.timings) >= {"merge", "eval", "run"} and first.worker == "local-0"
    expected = _fresh_merge(a)
    for name, tensor in expected.items():
        assert torch.equal(worker.params[name], tensor), name
    assert worker.run("b", b, TRAIN).status == "ok"
    again = worker.run("a2", a, TRAIN)
    assert again.scores == first.scores
    held = worker.run("a/held_out", a, HELD_OUT)
    assert held.status == "ok" and set(held.scores) == {"toy_arith_heldout"}


def test_failed_candidates_leave_worker_usable(local):
    worker, genome = local
    good = _candidates(genome, 1, seed=3)[0]
    reference = worker.run("ref", good, TRAIN)
    assert reference.status == "ok"
    worker.spec = replace(worker.spec, fault_injection={"raise": ["r"], "nan": ["n"]})
    try:
        raised = worker.run("r", good, TRAIN)
        assert raised.status == "failed" and raised.reason == "RuntimeError: injected fault for r"
        nan = worker.run("n", good, TRAIN)
        assert nan.status == "failed" and nan.reason == "non-finite weights in model.embed_tokens.weight"
        assert "eval" not in nan.timings  # not evaluated
    finally:
        worker.spec = replace(worker.spec, fault_injection=None)
    # Real failures: a parameter value no method accepts, and an infinite weight (decode never
    # makes one; a hand-written recipe can).
    bad = dict(good, parameters={**good["parameters"], "normalize": "sometimes"})
    planned = worker.run("bad", bad, TRAIN)
    assert planned.status == "failed" and planned.reason.startswith("RecipeError: ")
    huge = json.loads(json.dumps(good))
    huge["slices"][1]["sources"][0]["parameters"]["weight"] = float("inf")
    overflow = worker.run("huge", huge, TRAIN)
    assert overflow.status == "failed" and overflow.reason.startswith("non-finite weights in model.layers.2.")
    unknown = worker.run("u", good, "validation")
    assert unknown.status == "failed" and "unknown task set 'validation'" in unknown.reason
    assert worker.run("ref2", good, TRAIN).scores == reference.scores


def test_staging_path_for_a_model_on_another_device(local):
    """CPU merge + GPU model goes through staging tensors; exercised here with both on CPU."""
    worker, genome = local
    recipe = _candidates(genome, 1, seed=9)[0]
    direct = worker.run("direct", recipe, TRAIN)
    worker.run("other", _candidates(genome, 1, seed=10)[0], TRAIN)  # leave other weights behind
    template = worker._plan(worker.spec.template_recipe)
    worker._make_staging(template)
    try:
        staged = worker.run("staged", recipe, TRAIN)
    finally:
        worker.staging = None
    assert staged.status == "ok" and staged.scores == direct.scores
    for name, tensor in _fresh_merge(recipe).items():
        assert torch.equal(worker.params[name], tensor), name


def test_slerp_plans_with_other_model_orders_merge_the_right_tensors(models):
    """Candidates pairing models the template never paired (and in other orders) load what they
    need on first use and merge the right tensors."""
    config = _config(models, method="slerp")
    genome = Genome(config.genome, 4)
    worker = CandidateWorker(_spec(config, genome, threads=1))
    try:
        # Group 0 picks base then e2, group 1 e2 then e1: orders the template never had.
        x = np.zeros(genome.shape)
        x[0, :, 0, 0] = [0.5, 1.5, 3.0]
        x[1, :, 0, 0] = [1.0, 2.5, 0.0]
        recipe = genome.decode(x.reshape(-1))
        assert [s["model"] for s in recipe["slices"][0]["sources"]] == [str(models["base"]), str(models["e2"])]
        result = worker.run("s", recipe, TRAIN)
        assert result.status == "ok", result.reason
        for name, tensor in _fresh_merge(recipe).items():
            assert torch.equal(worker.params[name], tensor), name
    finally:
        worker.close()


def test_local_pool_runs_the_driver(models, tmp_path):
    config = _config(models)
    genome = Genome(config.genome, 4)
    pool = LocalPool(_spec(config, genome, threads=1))
    try:
        driver = SearchDriver(genome, RunStorage(tmp_path / "run"), config, popsize=4, max_fevals=4, seed=1)
        outcome = driver.run(pool)
    finally:
        pool.close()
    ledger = [r for r in RunStorage(tmp_path / "run").load_evaluations() if r["kind"] != "ask"]
    assert len(ledger) == 4 and all(r["status"] == "ok" for r in ledger)
    assert outcome.best is not None and outcome.evaluations == 4
    assert pool.stats()["workers"][0]["evaluations"] == 4


# -- Ray -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_pool_runs_the_driver_end_to_end(ray_cluster, models, tmp_path):
    """Two actors, one generation of 8 plus a held-out job; three candidates meet faults."""
    from evolve.workers import RayPool

    config = _config(models, held_out=[{"name": "toy_arith_heldout"}])
    genome = Genome(config.genome, 4)
    faults = {"raise": ["g00000-0001"], "nan": ["g00000-0002"], "exit": ["g00000-0003"],
              "once": ["g00000-0003"], "marker_dir": str(tmp_path)}
    with RayPool(_spec(config, genome, fault_injection=faults), 2, threads=1) as pool:
        assert len({w["pid"] for w in pool.stats()["workers"]}) == 2
        driver = SearchDriver(genome, RunStorage(tmp_path / "run"), config, max_fevals=8, seed=3,
                              schedule="sync")  # one generation of 8: the ids the faults name
        outcome = driver.run(pool)
        stats = pool.stats()
    ledger = {r["eval_id"]: r for r in RunStorage(tmp_path / "run").load_evaluations() if r["kind"] != "ask"}
    train = {k: r for k, r in ledger.items() if r["kind"] == TRAIN}
    assert sorted(train) == [f"g00000-{i:04d}" for i in range(8)] and outcome.evaluations == 8
    failed = {k for k, r in train.items() if r["status"] == "failed"}
    assert failed == {"g00000-0001", "g00000-0002"}
    assert train["g00000-0001"]["reason"].startswith("RuntimeError: injected fault")
    assert train["g00000-0002"]["reason"] == "non-finite weights in model.embed_tokens.weight"
    assert all(train[k]["fitness"] == driver.penalty for k in failed)
    # The crash in g00000-0003 cost one actor restart; its retry on the fresh actor succeeded.
    assert train["g00000-0003"]["status"] == "ok" and train["g00000-0003"]["timings"]["attempts"] == 2
    assert stats["restarts"] == 1
    assert {r["worker"] for r in train.values()} == {"worker-0", "worker-1"}
    assert outcome.best_held_out is not None and outcome.best_held_out["status"] == "ok"
    assert sum(w["evaluations"] for w in stats["workers"]) == len(ledger)
    assert 0 < stats["busy_fraction"] <= 1


@pytest.mark.slow
def test_ray_pool_retries_crashes_and_hangs(ray_cluster, models, tmp_path):
    from evolve.workers import RayPool

    config = _config(models, limit=8)
    genome = Genome(config.genome, 4)
    faults = {"exit": ["exit-once", "exit-always"], "hang": ["hang-once"], "once": ["exit-once", "hang-once"],
              "marker_dir": str(tmp_path)}
    spec = _spec(config, genome, fault_injection=faults)
    recipe = _candidates(genome, 1)[0]
    ids = ["exit-once", "exit-always", "hang-once", "plain", "plain2"]
    with RayPool(spec, 2, threads=1, timeout=8, max_retries=1) as pool:
        for eval_id in ids:  # more jobs than workers: the pool queues them
            pool.submit(eval_id, recipe, TRAIN)
        results = {}
        while len(results) < len(ids):
            for r in pool.wait_any():
                assert r.eval_id not in results
                results[r.eval_id] = r
        stats = pool.stats()
    assert results["exit-always"].status == "failed" and "worker died" in results["exit-always"].reason
    for eval_id in ("exit-once", "hang-once", "plain", "plain2"):
        assert results[eval_id].status == "ok", results[eval_id].reason
        assert results[eval_id].scores == results["plain"].scores
    assert results["hang-once"].timings["attempts"] == 2
    # exit-once: 1 restart, exit-always: 2 (first try + one retry), hang-once: 1.
    assert stats["restarts"] == 4 and sum(w["timeouts"] for w in stats["workers"]) == 1


@pytest.mark.slow
def test_ray_pool_setup_failure_is_one_clear_error(ray_cluster, models, tmp_path):
    from evolve.workers import RayPool, WorkerPoolError

    config = _config(models)
    genome = Genome(config.genome, 4)
    spec = _spec(config, genome, model_dir=tmp_path / "missing")
    start = time.monotonic()
    # A user-input error reads as it would without Ray: its own message, no type, no traceback.
    with pytest.raises(WorkerPoolError, match=r"^/.*missing: not a model folder \(no config.json\)$"):
        RayPool(spec, 1, threads=1)
    assert time.monotonic() - start < 120


def test_ray_pool_counts_cluster_gpus_only_for_gpu_workers(models):
    from evolve.workers import RayPool

    config = _config(models)
    spec = _spec(config, Genome(config.genome, 4))
    with pytest.raises(ValueError, match="one per GPU"):
        RayPool(spec, None, num_gpus_per_worker=0)
    with pytest.raises(ValueError, match=">= 1"):
        RayPool(spec, 0)
