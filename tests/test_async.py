"""The asynchronous (steady-state) schedule: no barrier, the ledger as the state.

The fake pool of test_search completes jobs in a seeded random order; a freed slot must get a
new candidate at once, the budget is used exactly, a killed run resumes into exactly the
optimizer state it died in, and nothing is evaluated twice.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_search import FakePool, Killed, make_config, make_driver, normalized_ledger

from evolve.storage import RunStorage, StorageError


def async_driver(path, **kw):
    return make_driver(path, **{"schedule": "async", "max_fevals": 40, **kw})


class CountingPool(FakePool):
    """Records how many jobs were in flight at every wait (before one completes)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.occupancy: list[int] = []

    def wait_any(self):
        self.occupancy.append(len(self.in_flight))
        return super().wait_any()


def train_ids(path) -> list[str]:
    return [r["eval_id"] for r in RunStorage(path).load_evaluations() if r["kind"] == "train"]


def test_every_freed_slot_gets_a_new_candidate_and_the_budget_is_exact(tmp_path):
    pool = CountingPool(num_workers=4, order_seed=1)
    outcome = async_driver(tmp_path).run(pool)
    ids = train_ids(tmp_path)
    assert len(ids) == len(set(ids)) == 40 and outcome.candidates == 40
    asks = [r for r in RunStorage(tmp_path).load_evaluations() if r["kind"] == "ask"]
    assert [r["seq"] for r in asks] == list(range(40))
    # full until the last candidates were handed out: 4 in flight at every wait before the tail
    train_waits = pool.occupancy[: 40 - 4]
    assert min(train_waits) == 4
    assert outcome.generations == 40 // 6  # told popsize at a time, in arrival order
    assert outcome.best is not None and outcome.best_held_out is not None


def test_results_are_told_in_arrival_order(tmp_path):
    async_driver(tmp_path).run(FakePool(num_workers=3, order_seed=7))
    train = [r for r in RunStorage(tmp_path).load_evaluations() if r["kind"] == "train"]
    assert [(r["generation"], r["index"]) for r in train] == [divmod(k, 6) for k in range(len(train))]


def test_async_beats_the_start_like_sync(tmp_path):
    """Sanity, not a benchmark (scripts/bench_scale.py compares the schedules over seeds)."""
    sync = make_driver(tmp_path / "sync", max_fevals=120, popsize=8).run(FakePool(num_workers=4))
    asyn = async_driver(tmp_path / "async", max_fevals=120, popsize=8).run(FakePool(num_workers=4, order_seed=3))
    assert asyn.best["fitness"] > sync.best["fitness"] - 0.15


def _strategy_state(driver):
    """(CMA-ES's mean, sigma, iterations, tells, ask calls, design points asked and told)."""
    design = driver.traj.strategy  # the default: a space-filling design, then CMA-ES
    assert design.size == 12  # two populations: points 2 and 9 fall in it, 17 and 30 after it
    es = design.inner.es if design.inner is not None else None
    mean = es.mean.copy() if es is not None else np.zeros(0)
    return (mean, es and float(es.sigma), es and es.countiter, driver.traj.tells, driver.traj.calls,
            design.asked, [(f, i, list(x)) for f, i, x in design.told])


@pytest.mark.parametrize("point", [1, 3, 6, 7, 12, 19, 26, 33])
def test_a_killed_run_resumes_with_nothing_lost_or_run_twice(tmp_path, point):
    with pytest.raises(Killed):
        async_driver(tmp_path).run(FakePool(num_workers=3, order_seed=point, kill_after_results=point))
    asked = {r["eval_id"]: r["x"] for r in RunStorage(tmp_path).load_evaluations() if r["kind"] == "ask"}
    answered = set(train_ids(tmp_path))
    resumed = async_driver(tmp_path)
    resumed.check_stored_run()  # replays without writing
    final = FakePool(num_workers=3, order_seed=point + 50)
    outcome = resumed.run(final)
    ids = train_ids(tmp_path)
    assert len(ids) == len(set(ids)) == 40 and outcome.candidates == 40
    reissued = set(asked) - answered
    assert reissued <= set(final.submitted), "candidates in flight at the kill were not issued again"
    assert not answered & set(final.submitted), "a ledgered evaluation ran again"
    final_x = {r["eval_id"]: r["x"] for r in RunStorage(tmp_path).load_evaluations() if r["kind"] == "train"}
    assert all(final_x[i] == asked[i] for i in reissued)


@pytest.mark.parametrize("point", [2, 9, 17, 30])
def test_replay_rebuilds_the_exact_optimizer_state(tmp_path, point):
    import shutil

    dead = async_driver(tmp_path / "run")
    with pytest.raises(Killed):
        dead.run(FakePool(num_workers=3, order_seed=point, kill_after_results=point))
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    fresh = async_driver(tmp_path / "copy")
    fresh.traj = fresh._trajectory(6, "async")
    fresh._replay(fresh.traj, RunStorage(tmp_path / "copy").load_evaluations(repair=False))
    mean, *rest = _strategy_state(dead)
    again = _strategy_state(fresh)
    assert np.array_equal(again[0], mean) and list(again[1:]) == rest
    # and the next point either asks is the same
    assert np.array_equal(dead.traj.strategy.ask(1)[0], fresh.traj.strategy.ask(1)[0])


def test_repeated_kills_use_the_budget_exactly(tmp_path):
    for seed, k in enumerate([5, 2, 9, 0, 4, 11]):
        with pytest.raises(Killed):
            async_driver(tmp_path).run(FakePool(num_workers=3, order_seed=seed, kill_after_results=k))
    async_driver(tmp_path).run(FakePool(num_workers=3, order_seed=99))
    ids = train_ids(tmp_path)
    assert len(ids) == len(set(ids)) == 40
    assert len(normalized_ledger(tmp_path)) == 40 + sum(1 for r in RunStorage(tmp_path).load_evaluations()
                                                        if r["kind"] == "held_out")


def test_the_schedule_is_kept_on_resume(tmp_path):
    with pytest.raises(Killed):
        async_driver(tmp_path, schedule=None).run(FakePool(kill_after_results=4))  # new: async
    assert async_driver(tmp_path, schedule=None)._settings(3)[1] == "async"
    with pytest.raises(StorageError, match="schedule differs"):
        make_driver(tmp_path, max_fevals=40).run(FakePool())  # --sync on an async run
    async_driver(tmp_path, schedule=None).run(FakePool())
    assert len(train_ids(tmp_path)) == 40


def test_a_foreign_ledger_is_refused_in_one_line(tmp_path):
    with pytest.raises(Killed):
        async_driver(tmp_path).run(FakePool(kill_after_results=6))
    lines = (tmp_path / "evaluations.jsonl").read_text().splitlines()
    import json

    first = json.loads(lines[0])
    first["x"][0] += 0.25
    lines[0] = json.dumps(first)
    (tmp_path / "evaluations.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(StorageError, match=r"cannot resume: ask call 0 re-asked on replay differs") as info:
        async_driver(tmp_path, config=make_config()).run(FakePool())
    assert "\n" not in str(info.value)


SCRIPT = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
import test_search as t
print("ready", flush=True)
t.make_driver(sys.argv[1], schedule="async", max_fevals=40).run(t.FakePool(order_seed=int(sys.argv[2]), delay=0.02))
print("finished")
"""


@pytest.mark.slow
def test_sigkill_at_random_instants_then_resume(tmp_path):
    """kill -9 of the driver process at random instants of an async run, then resume: every
    evaluation is in the ledger exactly once and the budget is used exactly."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    here = Path(__file__).resolve().parent
    script = tmp_path / "run_async.py"
    script.write_text(SCRIPT.format(repo=str(here.parent), tests=str(here)))
    seed = random.Random().randrange(10**6)  # printed on failure to replay the kill times
    rng = random.Random(seed)
    store = tmp_path / "store"
    kills = 0
    for attempt in range(1, 30):
        proc = subprocess.Popen([sys.executable, str(script), str(store), str(attempt)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        if kills < 4:
            time.sleep(rng.uniform(0.1, 0.6))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.communicate()
                kills += 1
                continue
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "finished" in out, f"seed {seed}: {err[-2000:]}"
        break
    assert kills >= 1, f"seed {seed}: every run finished before its kill"
    ids = train_ids(store)
    assert len(ids) == len(set(ids)) == 40, f"seed {seed}"
    asks = [r["eval_id"] for r in RunStorage(store).load_evaluations() if r["kind"] == "ask"]
    assert sorted(asks) == sorted(ids), f"seed {seed}: asked and answered differ"


@pytest.mark.parametrize("popsize", [3, 4, 5])
def test_small_populations_ask_one_at_a_time(tmp_path, popsize):
    """pycma mirrors samples of populations under 6 for the next whole ask; single asks must not
    leave them unused (pycma then refuses to tell)."""
    outcome = async_driver(tmp_path, popsize=popsize, max_fevals=30).run(FakePool(num_workers=2, order_seed=4))
    assert outcome.candidates == 30 and outcome.generations >= 30 // popsize - 1


def test_a_population_of_two_needs_sync(tmp_path):
    from merge_core.errors import RecipeError

    with pytest.raises(RecipeError, match="too small for the async schedule"):
        async_driver(tmp_path, popsize=2).run(FakePool())
    assert make_driver(tmp_path / "sync", popsize=2, max_fevals=8).run(FakePool()).candidates == 8
