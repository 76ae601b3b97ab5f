"""The EvaluationPool contract, run against every pool implementation (like optuna's storage tests).

Each test gets a pool of every kind (``local``: one in-process worker; ``ray``: two Ray actors)
built from the same WorkerSpec on tiny models that read the toy tasks, and checks what the
driver relies on: every submitted job comes back exactly once with its id, train and held-out
task sets score their own tasks, a failing candidate is a ``failed`` Result and leaves the pool
usable, the pool never invents work, and ``close`` can be called twice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from evolve.config import parse_evolve_config  # noqa: E402
from evolve.evaluation import EvalSettings  # noqa: E402
from evolve.genome import Genome  # noqa: E402
from evolve.protocols import HELD_OUT, TRAIN, Result  # noqa: E402
from evolve.workers import LocalPool, RayPool, WorkerSpec  # noqa: E402

POOLS = ["local", pytest.param("ray", marks=pytest.mark.slow)]


def _config(models: dict[str, Path]):
    genome = {"models": [str(models["e1"]), str(models["e2"])], "merge_method": "task_arithmetic",
              "base_model": str(models["base"]), "layer_granularity": 2}
    return parse_evolve_config({"genome": genome, "tasks": [{"name": "toy_arith"}],
                                "held_out": [{"name": "toy_arith_heldout"}], "limit": 10,
                                "apply_chat_template": False})


@pytest.fixture(scope="module", params=POOLS)
def pool_and_genome(request, task_models):
    config = _config(task_models)
    genome = Genome(config.genome, 4)
    template = genome.decode(genome.initial_point(False, np.random.default_rng(0)))
    settings = EvalSettings.from_config(config, device="cpu", builtin_tasks=False, batch_size=8, seed=7)
    spec = WorkerSpec(template_recipe=template, settings=settings, train_tasks=list(config.tasks),
                      held_out_tasks=list(config.held_out), threads=1)
    pool = LocalPool(spec) if request.param == "local" else RayPool(spec, 2, threads=1)
    yield pool, genome
    pool.close()


def _recipes(genome: Genome, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    lo, hi = (np.asarray(b) for b in genome.bounds)
    return [genome.decode(rng.uniform(lo, hi)) for _ in range(n)]


def _drain(pool, expected: int) -> list[Result]:
    out: list[Result] = []
    while len(out) < expected:
        out.extend(pool.wait_any())
    return out


def test_every_job_comes_back_once_with_its_id(pool_and_genome):
    pool, genome = pool_and_genome
    ids = [f"c{i}" for i in range(pool.num_workers + 2)]  # more jobs than workers: some queue
    for eval_id, recipe in zip(ids, _recipes(genome, len(ids), seed=1)):
        pool.submit(eval_id, recipe, TRAIN)
    results = _drain(pool, len(ids))
    assert sorted(r.eval_id for r in results) == sorted(ids)
    for r in results:
        assert isinstance(r, Result) and r.status == "ok", r.reason
        assert set(r.scores) == {"toy_arith"} and 0.0 <= r.scores["toy_arith"] <= 1.0
        assert r.worker and r.timings["run"] > 0


def test_same_recipe_same_scores_on_any_worker(pool_and_genome):
    pool, genome = pool_and_genome
    recipe = _recipes(genome, 1, seed=2)[0]
    n = 2 * pool.num_workers
    for i in range(n):
        pool.submit(f"same{i}", recipe, TRAIN)
    results = _drain(pool, n)
    assert len({r.scores["toy_arith"] for r in results}) == 1


def test_held_out_set_scores_its_own_tasks(pool_and_genome):
    pool, genome = pool_and_genome
    pool.submit("h/held_out", _recipes(genome, 1, seed=3)[0], HELD_OUT)
    (result,) = _drain(pool, 1)
    assert result.status == "ok" and set(result.scores) == {"toy_arith_heldout"}


def test_a_failing_candidate_is_a_failed_result_and_the_pool_goes_on(pool_and_genome):
    pool, genome = pool_and_genome
    good = _recipes(genome, 1, seed=4)[0]
    bad = dict(good, parameters={**good["parameters"], "normalize": "sometimes"})
    pool.submit("bad", bad, TRAIN)
    pool.submit("good", good, TRAIN)
    results = {r.eval_id: r for r in _drain(pool, 2)}
    assert results["bad"].status == "failed" and results["bad"].reason.startswith("RecipeError: ")
    assert results["good"].status == "ok"


def test_waiting_with_nothing_submitted_is_an_error(pool_and_genome):
    pool, _ = pool_and_genome
    with pytest.raises(RuntimeError, match="no job submitted"):
        pool.wait_any()


def test_stats_count_what_ran(pool_and_genome):
    pool, _ = pool_and_genome
    stats = pool.stats()
    assert len(stats["workers"]) == pool.num_workers
    assert sum(w["evaluations"] for w in stats["workers"]) >= 1
    assert 0 <= stats["busy_fraction"] <= 1


def test_close_twice_is_harmless(task_models):
    """(Last: builds a pool of its own.)"""
    config = _config(task_models)
    genome = Genome(config.genome, 4)
    template = genome.decode(genome.initial_point(False, np.random.default_rng(0)))
    spec = WorkerSpec(template_recipe=template, settings=EvalSettings.from_config(
        config, device="cpu", builtin_tasks=False, batch_size=8), train_tasks=list(config.tasks), threads=1)
    pool = LocalPool(spec)
    pool.close()
    pool.close()
