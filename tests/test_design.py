"""The space-filling start of CMA-ES (evolve/search/design.py): what it asks, when it hands over
to CMA-ES and from where, what the run records, and the config that turns it off."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_search import FakePool, make_config, make_driver

from evolve.config import normalized_config, parse_evolve_config
from evolve.genome import Genome
from evolve.search.design import InitialDesign
from evolve.search.strategies import make_strategy
from evolve.stacking_genome import StackingGenome
from evolve.storage import RunStorage
from merge_core.errors import RecipeError


def _ties_genome(**extra):
    config = parse_evolve_config({
        "genome": {"models": ["a", "b", "c"], "merge_method": "ties", "base_model": "base",
                   "layer_granularity": 2, "density_range": [0.2, 0.9], **extra},
        "tasks": [{"name": "t1"}]})
    return Genome(config.genome, 6)


def test_a_design_point_is_one_whole_model_merge_in_the_box():
    genome = _ties_genome(filters=["self_attn"])
    assert genome.shape == (3, 3, 2, 2) and genome.design_dimension == 12
    u = np.random.default_rng(0).uniform(size=12)
    x = genome.design_point(u).reshape(genome.shape)
    assert all(np.array_equal(x[0], x[g]) for g in range(3))  # every layer group alike
    lo, hi = (np.asarray(b).reshape(genome.shape) for b in genome.bounds)
    assert np.all(x >= lo) and np.all(x <= hi)
    assert np.allclose(x[0, ..., 0], 2.0 * u.reshape(3, 2, 2)[..., 0])  # weight box [0, 2]
    assert np.allclose(x[0, ..., 1], 0.2 + 0.7 * u.reshape(3, 2, 2)[..., 1])  # density [0.2, 0.9]
    assert np.allclose(genome.design_point(np.zeros(12)), lo.reshape(-1))
    assert np.allclose(genome.design_point(np.ones(12)), hi.reshape(-1))


def _design(seed=0, size=8, popsize=4, **kw):
    genome = _ties_genome()
    x0 = genome.initial_point(False, np.random.default_rng(0))
    return genome, x0, make_strategy("cmaes", x0, 1 / 6, bounds=genome.bounds, popsize=popsize, seed=seed,
                                     scales=genome.scales, mirrors=False, design_size=size, design_space=genome, **kw)


def test_the_design_starts_at_the_start_point_then_fills_the_box_by_seed():
    genome, x0, design = _design(seed=1)
    assert isinstance(design, InitialDesign) and design.inner is None and design.popsize == 4
    points = design.ask(4) + design.ask(4)
    assert np.array_equal(points[0], x0)
    tied = [p.reshape(genome.shape) for p in points[1:]]
    assert all(np.array_equal(t[0], t[2]) for t in tied)
    assert len({p.tobytes() for p in points}) == 8
    again = _design(seed=1)[2]
    assert all(np.array_equal(a, b) for a, b in zip(points, again.ask(8)))
    other = _design(seed=2)[2].ask(8)
    assert not np.allclose(points[1], other[1])
    # spread over the box: every weight gene sees both halves of [0, 2] within 8 points
    weights = np.array([t[0, :, 0, 0] for t in tied])
    assert np.all(weights.min(axis=0) < 1.0) and np.all(weights.max(axis=0) > 1.0)


def test_cma_es_starts_at_the_best_design_point_once_the_design_is_told():
    genome, _, design = _design(size=6, popsize=4)
    points = design.ask(4)
    design.tell(points, [0.1, 0.5, 0.2, 0.3])
    more = design.ask(4)  # asks before the design is told keep getting design points
    assert design.inner is None and design.asked == 8
    design.tell(more[:2], [0.9, 0.9])  # a tie: the earlier one wins
    assert design.inner is not None and design.best_design_point is not None
    assert np.array_equal(design.best_design_point, more[0])
    assert np.allclose(design.inner.es.mean, more[0])
    assert design.popsize == design.inner.popsize and design.sigma == design.inner.sigma
    # the two design points still out come back in CMA-ES's first batch (pycma clips them)
    own = design.ask(2)
    assert not any(np.array_equal(p, q) for p in own for q in more)
    design.tell(more[2:] + own, [0.0, 0.0, 0.5, 0.6])
    assert design.inner.es.countiter == 1


def test_a_design_never_starts_for_tpe_and_is_refused_where_it_cannot_be():
    genome = _ties_genome()
    with pytest.raises(RecipeError, match="search.initial_design: tpe takes no initial design"):
        make_strategy("tpe", [0.0] * genome.dimension, 1 / 6, bounds=genome.bounds, popsize=4, seed=0,
                      scales=genome.scales, design_size=4, design_space=genome)
    with pytest.raises(RecipeError, match="search.initial_design: must be a number of evaluations >= 0"):
        make_config(search={"initial_design": -1})
    with pytest.raises(RecipeError, match="search.initial_design: tpe takes no initial design"):
        make_config(search={"strategy": "tpe", "initial_design": 8})


def _asks(path):
    return [np.asarray(r["x"]) for r in RunStorage(path).load_evaluations() if r["kind"] == "ask"]


def test_a_default_run_records_and_runs_its_design(tmp_path):
    driver = make_driver(tmp_path, schedule="async", max_fevals=30)
    outcome = driver.run(FakePool(num_workers=3, order_seed=4))
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert manifest["initial_design"] == 12  # two populations of 6
    provenance = json.loads((tmp_path / "best_config.provenance.json").read_text())
    assert provenance["search"]["initial_design"] == 12
    asks = _asks(tmp_path)
    shape = driver.genome.shape
    design = [x.reshape(shape) for x in asks[1:12]]
    assert all(np.array_equal(x[0], x[1]) for x in design)  # whole-model merges
    assert not np.array_equal(asks[-1].reshape(shape)[0], asks[-1].reshape(shape)[1])  # CMA-ES's
    assert outcome.candidates == 30 and outcome.best["fitness"] > 0.5


def test_initial_design_zero_is_plain_cma_es(tmp_path):
    make_driver(tmp_path, config=make_config(search={"initial_design": 0}), max_fevals=12).run(FakePool())
    assert json.loads((tmp_path / "run.json").read_text())["initial_design"] == 0
    shape = make_driver(tmp_path).genome.shape
    assert not any(np.array_equal(x.reshape(shape)[0], x.reshape(shape)[1]) for x in _asks(tmp_path)[1:])


def test_tpe_and_stacking_take_no_design_by_default(tmp_path):
    make_driver(tmp_path, config=make_config(search={"strategy": "tpe"}), strategy="tpe",
                max_fevals=6).run(FakePool())
    assert json.loads((tmp_path / "run.json").read_text())["initial_design"] == 0
    assert StackingGenome(["a", "b"], 4).design_by_default is False
    assert Genome(make_config().genome, 4).design_by_default is True


def test_a_stored_run_keeps_its_design(tmp_path):
    from evolve.storage import StorageError

    make_driver(tmp_path, max_fevals=12).run(FakePool())
    with pytest.raises(StorageError, match="differs"):
        make_driver(tmp_path, config=make_config(search={"initial_design": 6}), max_fevals=24).run(FakePool())
    make_driver(tmp_path, max_fevals=24).run(FakePool())  # the default: the stored run's 12
    assert json.loads((tmp_path / "run.json").read_text())["initial_design"] == 12


def test_configs_without_the_setting_hash_as_before():
    config = make_config(search={"strategy": "cmaes"})
    assert "initial_design" not in normalized_config(config)["search"]
    assert normalized_config(make_config(search={"initial_design": 0}))["search"]["initial_design"] == 0
