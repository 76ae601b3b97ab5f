"""The CMA-ES driver with a fake in-process pool whose score is a deterministic function of the recipe.

Covers: improvement, seeded reproducibility, the fitness cache, penalised failures, held-out
re-scoring in idle slots, and resume after interruptions at many points (simulated kills inside
the pool, a kill between tell and state save, a torn ledger line, and a real SIGKILL).
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from evolve.config import parse_evolve_config
from evolve.genome import Genome, recipe_hash
from evolve.search import HELD_OUT, TRAIN, Result, SearchDriver, default_popsize, weighted_fitness
from evolve.storage import RunStorage, StorageError

TARGET = [0.3, -0.2, 0.5, 0.1, 0.4, -0.3]


def make_config(box=True, **overrides):
    """The fake search's config; ``box``: the explicit weight box [-1, 1] (the box of 0.1, so the
    trajectories these tests pin are those of tests/data/runs/v0_1_killed; False: the default box)."""
    data = {
        "genome": {"models": ["a", "b", "c"], "merge_method": "task_arithmetic", "base_model": "base",
                   "layer_granularity": 2, "allow_negative_weights": True},
        "tasks": [{"name": "t1", "weight": 0.4}, {"name": "t2", "weight": 0.6, "metric": "acc_norm,none"}],
        "held_out": [{"name": "h1"}],
    }
    if box:
        data["genome"]["weight_range"] = [-1.0, 1.0]
    data.update(overrides)
    return parse_evolve_config(data)


class Killed(Exception):
    """Stands for the process dying at that instant."""


def recipe_weights(recipe: dict) -> list[float]:
    return [src["parameters"]["weight"] for sl in recipe["slices"] for src in sl["sources"] if "parameters" in src]


def fake_scores(recipe: dict, task_set: str) -> dict:
    d2 = sum((w - t) ** 2 for w, t in zip(recipe_weights(recipe), TARGET))
    if task_set == HELD_OUT:
        return {"h1": {"acc,none": math.exp(-2 * d2)}}
    return {"t1": {"acc,none": math.exp(-d2)}, "t2": {"acc_norm,none": 1 / (1 + d2)}}


class FakePool:
    """Evaluates in wait_any; FIFO or shuffled completion order; can 'die' at a chosen point."""

    def __init__(self, num_workers=3, *, kill_after_submits=None, kill_after_results=None, order_seed=None,
                 fail_prefixes=(), delay=0.0):
        self.num_workers = num_workers
        self.kill_after_submits = kill_after_submits
        self.kill_after_results = kill_after_results
        self.rng = random.Random(order_seed) if order_seed is not None else None
        self.fail_prefixes = tuple(fail_prefixes)
        self.delay = delay
        self.in_flight: list[tuple[str, dict, str]] = []
        self.submitted: list[str] = []
        self.delivered: list[str] = []
        self.train_hashes: list[str] = []
        self.heldout_beside_train = False

    def submit(self, eval_id, recipe, task_set):
        if self.kill_after_submits is not None and len(self.submitted) >= self.kill_after_submits:
            raise Killed(f"after {len(self.submitted)} submissions")
        assert task_set in (TRAIN, HELD_OUT)
        self.submitted.append(eval_id)
        if task_set == TRAIN:
            self.train_hashes.append(recipe_hash(recipe))
        self.in_flight.append((eval_id, recipe, task_set))
        assert len(self.in_flight) <= self.num_workers, "the driver overfilled the pool"
        if {ts for _, _, ts in self.in_flight} == {TRAIN, HELD_OUT}:
            self.heldout_beside_train = True

    def wait_any(self):
        assert self.in_flight, "wait_any with nothing in flight"
        if self.kill_after_results is not None and len(self.delivered) >= self.kill_after_results:
            raise Killed(f"after {len(self.delivered)} results")
        k = self.rng.randrange(len(self.in_flight)) if self.rng else 0
        eval_id, recipe, task_set = self.in_flight.pop(k)
        if self.delay:
            time.sleep(self.delay)
        self.delivered.append(eval_id)
        if task_set == TRAIN and recipe_hash(recipe).startswith(self.fail_prefixes):
            return [Result(eval_id, status="failed", reason="CUDA out of memory (fake)", worker="w0")]
        return [Result(eval_id, scores=fake_scores(recipe, task_set), worker=f"w{k}", timings={"eval_s": 0.01})]


def make_driver(path, config=None, genome_cls=Genome, **kwargs):
    """A driver on the fake objective; sync unless ``schedule`` says otherwise (these tests compare
    whole ledgers, which only the generation barrier makes independent of completion order)."""
    config = config or make_config()
    genome = genome_cls.for_run(config.genome, 4, RunStorage(path).read_manifest())
    opts = {"sigma0": 0.2, "popsize": 6, "seed": 3, "max_fevals": 36, "versions": {"test": "1"},
            "schedule": "sync"}
    opts.update(kwargs)
    return SearchDriver(genome, RunStorage(path), config, **opts)


def normalized_ledger(path, drop=("worker", "timings", "node")) -> list[dict]:
    """The results without what legitimately varies between runs: worker ids, nodes, timings,
    line order (ask records, the optimizer's bookkeeping, are left out)."""
    out = []
    for r in RunStorage(path).load_evaluations():
        if r["kind"] != "ask":
            out.append({k: v for k, v in r.items() if k not in drop})
    return sorted(out, key=lambda r: r["eval_id"])


def best_of(path) -> str:
    header = (Path(path) / "best_config.yaml").read_text().split("\n", 3)[:3]
    return "\n".join(header)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted seeded run (FIFO pool) to compare every interrupted run with."""
    path = tmp_path_factory.mktemp("reference")
    outcome = make_driver(path).run(FakePool())
    return path, outcome


def test_default_popsize_is_a_multiple_of_workers():
    assert default_popsize(6, 1) == 9  # pycma: 4 + floor(3 ln 6)
    assert default_popsize(6, 4) == 12
    assert default_popsize(12, 2) == 12 and default_popsize(100, 8) == 24


def test_weighted_fitness():
    config = make_config()
    scores = {"t1": {"acc,none": 0.5}, "t2": {"acc_norm,none": 1.0, "acc,none": 0.0}}
    assert weighted_fitness(config.tasks, scores) == pytest.approx(0.4 * 0.5 + 0.6 * 1.0)
    with pytest.raises(ValueError, match="'t2' metric 'acc_norm,none'"):
        weighted_fitness(config.tasks, {"t1": {"acc,none": 0.5}, "t2": {"acc,none": 1.0}})
    with pytest.raises(ValueError):
        weighted_fitness(config.tasks, {"t1": {"acc,none": float("nan")}, "t2": {"acc_norm,none": 1.0}})
    # the flat shape of evolve.evaluation's EvalResult.scores: by name, or "name:metric"
    assert weighted_fitness(config.tasks, {"t1": 0.5, "t2": 1.0}) == pytest.approx(0.8)
    assert weighted_fitness(config.tasks, {"t1": 0.5, "t2:acc_norm,none": 1.0}) == pytest.approx(0.8)


def test_reference_run_shape(reference):
    path, outcome = reference
    ledger = normalized_ledger(path)
    train = [r for r in ledger if r["kind"] == TRAIN]
    assert outcome.generations == 6 and outcome.candidates == 36 and len(train) == 36
    assert {(r["generation"], r["index"]) for r in train} == {(g, i) for g in range(6) for i in range(6)}
    assert outcome.best["fitness"] == max(r["fitness"] for r in train)
    assert outcome.best_held_out is not None and outcome.best_held_out["status"] == "ok"
    assert outcome.best_held_out["of"] == outcome.best["eval_id"]
    assert outcome.best_recipe == make_driver(path).genome.decode(outcome.best["x"])
    assert outcome.stop_reason == "max_fevals 36 reached"
    text = (path / "best_config.yaml").read_text()
    assert f"eval_id: {outcome.best['eval_id']}" in text and "held_out_scores" in text
    for r in train:
        lo, hi = make_driver(path).genome.bounds
        assert all(a <= v <= b for a, v, b in zip(lo, r["x"], hi))


def test_optimizer_improves(tmp_path):
    driver = make_driver(tmp_path, max_fevals=120, popsize=8)
    x0 = driver.genome.initial_point(False, np.random.default_rng(0))
    f0 = weighted_fitness(driver.config.tasks, fake_scores(driver.genome.decode(x0), TRAIN))
    outcome = driver.run(FakePool(num_workers=4))
    ledger = normalized_ledger(tmp_path)
    by_gen = {}
    for r in ledger:
        if r["kind"] == TRAIN:
            by_gen.setdefault(r["generation"], []).append(r["fitness"])
    assert outcome.best["fitness"] > f0 + 0.1
    assert np.mean(by_gen[max(by_gen)]) > np.mean(by_gen[0]) + 0.1
    held = [r for r in ledger if r["kind"] == HELD_OUT]
    # held-out jobs go to the successive incumbents only, in improving order
    assert 1 <= len(held) < outcome.generations + 1
    fits = [next(x for x in ledger if x["eval_id"] == h["of"])["fitness"] for h in held]
    assert fits == sorted(fits) and len(set(fits)) == len(fits)


def test_seeded_runs_are_reproducible_and_order_independent(tmp_path, reference):
    ref_path, _ = reference
    make_driver(tmp_path / "shuffled").run(FakePool(num_workers=2, order_seed=11))
    assert normalized_ledger(tmp_path / "shuffled") == normalized_ledger(ref_path)
    assert best_of(tmp_path / "shuffled") == best_of(ref_path)
    make_driver(tmp_path / "other", seed=4).run(FakePool())
    xs = lambda p: [r["x"] for r in normalized_ledger(p) if r["kind"] == TRAIN]  # noqa: E731
    assert xs(tmp_path / "other") != xs(ref_path)


def test_global_numpy_rng_is_not_used(tmp_path):
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    make_driver(tmp_path, max_fevals=12).run(FakePool())
    assert np.array_equal(np.random.get_state()[1], before)


class CoarseGenome(Genome):
    """Rounds weights to a 0.5 grid, so candidates often share a recipe (exercises the cache)."""

    def decode(self, x):
        return super().decode([round(v * 2) / 2 for v in x])


def test_cache_avoids_reevaluation(tmp_path):
    pool = FakePool(num_workers=3, order_seed=5)
    config = make_config(search={"initial_design": 0})  # CMA-ES from the start: its points repeat
    outcome = make_driver(tmp_path, config=config, genome_cls=CoarseGenome, max_fevals=60).run(pool)
    ledger = {r["eval_id"]: r for r in normalized_ledger(tmp_path)}
    train = [r for r in ledger.values() if r["kind"] == TRAIN]
    cached = [r for r in train if r["cached_from"]]
    assert len(train) == 60 and len(cached) >= 10
    assert len(pool.train_hashes) == len(set(pool.train_hashes)) == 60 - len(cached)
    assert outcome.evaluations == 60 - len(cached)
    for r in cached:
        src = ledger[r["cached_from"]]
        assert src["cached_from"] is None and src["recipe_hash"] == r["recipe_hash"]
        assert (src["generation"], src["index"]) < (r["generation"], r["index"])
        assert (src["fitness"], src["scores"], src["status"]) == (r["fitness"], r["scores"], r["status"])
    assert any(ledger[r["cached_from"]]["generation"] == r["generation"] for r in cached)  # waited in-gen
    # and the cache behaves the same when resumed mid-run
    try:
        make_driver(tmp_path / "resumed", config=config, genome_cls=CoarseGenome, max_fevals=60).run(
            FakePool(num_workers=3, order_seed=6, kill_after_results=17))
    except Killed:
        pass
    make_driver(tmp_path / "resumed", config=config, genome_cls=CoarseGenome, max_fevals=60).run(
        FakePool(order_seed=7))
    assert normalized_ledger(tmp_path / "resumed") == list(sorted(ledger.values(), key=lambda r: r["eval_id"]))


def test_failed_candidates_are_penalised_and_run_completes(tmp_path):
    driver = make_driver(tmp_path, penalty=-5.0)
    outcome = driver.run(FakePool(fail_prefixes=("0", "1", "2")))
    failed = [r for r in normalized_ledger(tmp_path) if r["status"] == "failed"]
    assert failed, "the fake pool should have failed some candidates"
    for r in failed:
        assert r["fitness"] == -5.0 and r["reason"] == "CUDA out of memory (fake)" and r["scores"] == {}
    assert outcome.candidates == 36 and outcome.best["status"] == "ok"


def test_missing_metric_is_a_failure_with_reason(tmp_path):
    class MissingMetricPool(FakePool):
        def wait_any(self):
            (res,) = super().wait_any()
            if res.status == "ok" and "t2" in res.scores and res.eval_id.endswith("3"):
                res.scores = {"t1": res.scores["t1"], "t2": {"acc,none": 0.9}}  # asked acc_norm,none
            return [res]

    make_driver(tmp_path).run(MissingMetricPool())
    bad = [r for r in normalized_ledger(tmp_path) if r["kind"] == TRAIN and r["eval_id"].endswith("3")]
    assert bad and all(r["status"] == "failed" and "acc_norm,none" in r["reason"] for r in bad)
    assert all(r["fitness"] == -2.0 for r in bad)  # default penalty: -(0.4 + 0.6) - 1


class ReasonPool(FakePool):
    """Fails every train candidate with ``reason(eval_id)``, except the first ``ok_first`` results."""

    def __init__(self, reason, ok_first=0, **kw):
        super().__init__(**kw)
        self.reason, self.ok_first = reason, ok_first

    def wait_any(self):
        (res,) = super().wait_any()
        if res.eval_id.endswith(HELD_OUT) or len(self.delivered) <= self.ok_first:
            return [res]
        return [Result(res.eval_id, status="failed", reason=self.reason(res.eval_id), worker="w0")]


def test_the_same_deterministic_failure_from_the_start_stops_the_run(tmp_path):
    from evolve.search.failures import SystematicFailure

    reason = "EvalError: task 't1' has no metric 'acc,none' (available: f1,none)"
    with pytest.raises(SystematicFailure, match="the first 4 candidates all failed with: EvalError") as info:
        make_driver(tmp_path).run(ReasonPool(lambda _id: reason, num_workers=3))
    assert "\n" not in str(info.value)
    ledger = normalized_ledger(tmp_path)
    assert len(ledger) == 4 and all(r["status"] == "failed" and r["reason"] == reason for r in ledger)


@pytest.mark.parametrize("why", ["transient", "different", "after a success"])
def test_failures_that_are_not_systematic_do_not_stop_the_run(tmp_path, why):
    if why == "transient":
        pool = ReasonPool(lambda _id: "worker died (RayActorError) (attempt 3 of 3)")
    elif why == "different":
        pool = ReasonPool(lambda eval_id: f"non-finite weights in tensor {eval_id}")
    else:  # the first result succeeds and every later one fails alike: the search's luck, not the setup
        pool = ReasonPool(lambda _id: "EvalError: broken", ok_first=1)
    outcome = make_driver(tmp_path).run(pool)
    # Not stopped after the first 4: at least the whole first generation of 6 ran (all-alike
    # failures give a flat fitness, which pycma itself may then call converged: its stop, not ours).
    assert outcome.candidates >= 6 and len(normalized_ledger(tmp_path)) >= 6


def test_held_out_jobs_fill_idle_slots(tmp_path):
    pool = FakePool(num_workers=4, order_seed=2)
    make_driver(tmp_path, popsize=8, max_fevals=48).run(pool)
    assert pool.heldout_beside_train, "held-out re-scoring never ran beside train candidates"


def kill_and_resume(path, pools, **driver_kwargs):
    """Run with each pool in turn (all but the last die); return ledger ids known before each resume."""
    seen_before = []
    for pool in pools:
        seen_before.append({r["eval_id"] for r in RunStorage(path).load_evaluations() if r["kind"] != "ask"})
        try:
            make_driver(path, **driver_kwargs).run(pool)
        except Killed:
            continue
        # a finished run must not be waiting for more pools
        assert pool is pools[-1]
    return seen_before


@pytest.mark.parametrize("kind", ["submits", "results"])
@pytest.mark.parametrize("point", [0, 1, 2, 4, 6, 7, 11, 13, 19, 24, 30, 35, 37])
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, reference, kind, point):
    ref_path, ref_outcome = reference
    first = FakePool(order_seed=point, **{f"kill_after_{kind}": point})
    final = FakePool(order_seed=point + 100)
    seen = kill_and_resume(tmp_path, [first, final])
    assert normalized_ledger(tmp_path) == normalized_ledger(ref_path)
    assert best_of(tmp_path) == best_of(ref_path)
    # nothing already in the ledger was evaluated again
    assert not seen[1] & set(final.submitted)


def test_repeated_kills_then_resume(tmp_path, reference):
    ref_path, _ = reference
    pools = [FakePool(order_seed=s, kill_after_results=k) for s, k in enumerate([3, 1, 5, 0, 8, 2, 9])]
    pools.append(FakePool(order_seed=99))
    seen = kill_and_resume(tmp_path, pools)
    assert normalized_ledger(tmp_path) == normalized_ledger(ref_path)
    for before, pool in zip(seen, pools):
        assert not before & set(pool.submitted)


def test_kill_between_the_last_result_and_its_tell(tmp_path, reference, monkeypatch):
    """The tell is not stored: dying right after generation 2's last result was ledgered, the
    resumed run tells it from the ledger and evaluates nothing of it again."""
    from evolve.search.trajectory import Trajectory

    ref_path, _ = reference
    calls = {"n": 0}
    original = Trajectory._tell

    def dying_tell(self, ids):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed("before tell(2)")
        return original(self, ids)

    monkeypatch.setattr(Trajectory, "_tell", dying_tell)
    with pytest.raises(Killed):
        make_driver(tmp_path).run(FakePool())
    monkeypatch.undo()
    gen2 = {r["eval_id"] for r in normalized_ledger(tmp_path) if r.get("generation") == 2}
    assert len(gen2) == 6
    final = FakePool()
    make_driver(tmp_path).run(final)
    assert not gen2 & set(final.submitted)
    assert normalized_ledger(tmp_path) == normalized_ledger(ref_path)


def test_no_pickle_is_read_or_written(tmp_path, reference):
    assert not any(p.suffix == ".pkl" for p in reference[0].iterdir())
    asks = [r for r in RunStorage(reference[0]).load_evaluations() if r["kind"] == "ask"]
    assert len(asks) == 36 and [r["call"] for r in asks] == [g for g in range(6) for _ in range(6)]


STORED_RUNS = Path(__file__).parent / "data" / "runs"


def test_run_directory_of_an_earlier_version_resumes(tmp_path):
    """``tests/data/runs/v0_1_killed``: this test's make_driver() settings, run with the flat
    ``evolve/search.py`` of merge-evolve 0.1 (before the package split) and killed after 14
    results. Resumed now, it completes exactly as an uninterrupted run of today's code."""
    import shutil

    run = tmp_path / "old"
    shutil.copytree(STORED_RUNS / "v0_1_killed", run)
    (run / "search_state.pkl").write_bytes(b"not a pickle: the optimizer is rebuilt from the ledger")
    # Its config has no weight_range and its manifest neither a schedule nor a box: a sync run in
    # the box of 0.1, replayed from its ledger.
    make_driver(run, config=make_config(box=False), schedule=None).run(FakePool(3))
    # ... and without the initial design (which 0.1 had not), as its manifest tells
    ref = tmp_path / "ref"
    make_driver(ref, config=make_config(search={"initial_design": 0})).run(FakePool())
    legacy = ("worker", "timings", "node", "seq")  # fields records of 0.1 did not have yet
    assert normalized_ledger(run, legacy) == normalized_ledger(ref, legacy)
    assert best_of(run) == best_of(ref)


def test_torn_ledger_line_then_resume(tmp_path, reference):
    ref_path, _ = reference
    with pytest.raises(Killed):
        make_driver(tmp_path).run(FakePool(kill_after_results=14))
    with open(tmp_path / "evaluations.jsonl", "ab") as fh:
        fh.write(b'{"eval_id": "g00002-0003", "kind": "tr')  # died in the middle of an append
    make_driver(tmp_path).run(FakePool())
    assert normalized_ledger(tmp_path) == normalized_ledger(ref_path)


def test_budget_can_be_extended_on_resume(tmp_path, reference):
    ref_path, _ = reference
    short = make_driver(tmp_path, max_fevals=14).run(FakePool())
    assert short.candidates == 18  # whole generations: 3 x 6 >= 14
    make_driver(tmp_path, max_fevals=36).run(FakePool())
    assert normalized_ledger(tmp_path) == normalized_ledger(ref_path)


def test_resume_is_refused_with_other_settings(tmp_path):
    with pytest.raises(Killed):
        make_driver(tmp_path).run(FakePool(kill_after_results=5))
    other = make_config(tasks=[{"name": "t1", "weight": 0.5}, {"name": "t2", "weight": 0.6, "metric": "acc_norm,none"}])
    with pytest.raises(StorageError, match=r"config\.tasks\[0\]\.weight differs"):
        make_driver(tmp_path, config=other).run(FakePool())
    with pytest.raises(StorageError, match="seed differs"):
        make_driver(tmp_path, seed=9).run(FakePool())
    with pytest.raises(StorageError, match="popsize differs"):
        make_driver(tmp_path, popsize=8).run(FakePool())
    # vllm engine settings may change between sessions
    tuned = make_config(vllm={"gpu_memory_utilization": 0.5})
    make_driver(tmp_path, config=tuned).run(FakePool())


def test_popsize_none_resolves_from_workers_then_sticks(tmp_path):
    outcome = make_driver(tmp_path, popsize=None, max_fevals=10).run(FakePool(num_workers=4))
    assert outcome.candidates % 12 == 0  # default 9 for n=6, rounded up to 4 workers
    again = make_driver(tmp_path, popsize=None, max_fevals=30).run(FakePool(num_workers=5))
    assert again.candidates == 36


SCRIPT = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
import test_search as t
print("ready", flush=True)
t.make_driver(sys.argv[1]).run(t.FakePool(order_seed=int(sys.argv[2]), delay=0.02))
print("finished")
"""


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(tmp_path, reference):
    ref_path, _ = reference
    script = tmp_path / "run_search.py"
    here = Path(__file__).resolve().parent
    script.write_text(SCRIPT.format(repo=str(here.parent), tests=str(here)))

    def start(store, order_seed):
        return subprocess.Popen([sys.executable, str(script), str(store), str(order_seed)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # An uninterrupted subprocess run: the timescale for the kills, and a cross-process check.
    proc = start(tmp_path / "whole", 0)
    assert proc.stdout.readline().strip() == "ready"
    began = time.monotonic()
    out, err = proc.communicate(timeout=300)
    run_s = time.monotonic() - began
    assert "finished" in out, err[-2000:]
    assert normalized_ledger(tmp_path / "whole") == normalized_ledger(ref_path)
    total = len(normalized_ledger(ref_path))

    seed = random.Random().randrange(10**6)  # printed on failure to replay the kill times
    rng = random.Random(seed)
    for trial in range(5):  # a trial whose kills all missed the evaluations is started over
        store = tmp_path / f"store{trial}"
        mid_run_kills = 0
        for attempt in range(1, 40):
            proc = start(store, attempt)
            assert proc.stdout.readline().strip() == "ready"
            if attempt <= 20 and mid_run_kills < 3:
                time.sleep(rng.uniform(0.05, 0.7) * run_s)
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.communicate()
                    done = len(RunStorage(store).load_evaluations()) if store.exists() else 0
                    mid_run_kills += 0 < done < total
                    continue
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0 and "finished" in out, f"seed {seed}: {err[-2000:]}"
            break
        assert normalized_ledger(store) == normalized_ledger(ref_path), f"seed {seed}"
        assert best_of(store) == best_of(ref_path)
        if mid_run_kills:
            break
    assert mid_run_kills >= 1, f"seed {seed}: no kill landed while evaluations were being ledgered"
