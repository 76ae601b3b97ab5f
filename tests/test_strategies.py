"""The search strategies behind one Protocol: each runs both schedules, replays from its ledger
exactly (the state-from-ledger contract), and keeps to its own promise (IPOP restarts, TPE
starts at the genome's start point)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from test_search import FakePool, Killed, make_config, make_driver

from evolve.config import STRATEGY_NAMES
from evolve.protocols import Result
from evolve.search.strategies import STRATEGIES
from evolve.storage import RunStorage

pytest.importorskip("optuna")


def test_the_config_knows_every_strategy():
    assert tuple(STRATEGIES) == STRATEGY_NAMES


def _config(strategy):
    return make_config(search={"strategy": strategy})


@pytest.mark.parametrize("schedule", ["async", "sync"])
@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_every_strategy_searches_and_replays_exactly(tmp_path, strategy, schedule):
    run = tmp_path / "run"
    dead = make_driver(run, config=_config(strategy), strategy=strategy, schedule=schedule, max_fevals=36)
    with pytest.raises(Killed):
        dead.run(FakePool(num_workers=3, order_seed=5, kill_after_results=17))
    shutil.copytree(run, tmp_path / "copy")
    fresh = make_driver(tmp_path / "copy", config=_config(strategy), strategy=strategy, schedule=schedule,
                        max_fevals=36)
    fresh.traj = fresh._trajectory(6, schedule)
    fresh._replay(fresh.traj, RunStorage(tmp_path / "copy").load_evaluations(repair=False))
    assert fresh.traj.tells == dead.traj.tells and fresh.traj.calls == dead.traj.calls
    assert np.array_equal(fresh.traj.strategy.ask(1)[0], dead.traj.strategy.ask(1)[0])
    outcome = make_driver(run, config=_config(strategy), strategy=strategy, schedule=schedule,
                          max_fevals=36).run(FakePool(num_workers=3, order_seed=6))
    assert outcome.candidates >= 36 and outcome.best["fitness"] > 0.5


def test_a_stored_run_keeps_its_strategy(tmp_path):
    from evolve.storage import StorageError

    with pytest.raises(Killed):
        make_driver(tmp_path, config=_config("tpe"), strategy="tpe").run(FakePool(kill_after_results=3))
    with pytest.raises(StorageError, match="strategy differs"):
        make_driver(tmp_path, config=_config("tpe"), strategy="cmaes").run(FakePool())


class FlatPool(FakePool):
    """Every candidate scores the same: pycma's flat-fitness stop fires after one generation."""

    def wait_any(self):
        (res,) = super().wait_any()
        return [Result(res.eval_id, scores={"t1": {"acc,none": 0.5}, "t2": {"acc_norm,none": 0.5}}, worker="w")]


def test_ipop_restarts_with_a_doubled_population_where_cma_es_stops(tmp_path):
    plain = make_driver(tmp_path / "cma", max_fevals=60).run(FlatPool())
    assert plain.candidates < 60 and "cma stop" in plain.stop_reason
    ipop = make_driver(tmp_path / "ipop", config=_config("ipop-cmaes"), strategy="ipop-cmaes",
                       max_fevals=60).run(FlatPool())
    assert ipop.candidates >= 60
    sizes = {}
    for r in RunStorage(tmp_path / "ipop").load_evaluations():
        if r["kind"] == "train":
            sizes[r["generation"]] = sizes.get(r["generation"], 0) + 1
    assert sorted(set(sizes.values()))[:2] == [6, 12]  # 6, then 12 after the first restart


def test_tpe_starts_at_the_genomes_start_point(tmp_path):
    driver = make_driver(tmp_path, config=_config("tpe"), strategy="tpe", max_fevals=6)
    driver.run(FakePool())
    first = next(r for r in RunStorage(tmp_path).load_evaluations() if r["kind"] == "ask")
    x0 = driver.genome.initial_point(False, np.random.default_rng(driver.seed))
    assert first["x"] == pytest.approx(x0)
