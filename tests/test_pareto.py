"""Multi-objective search (``search.objectives: pareto``) and per-task floors: config validation,
feasibility ranking, the multi-objective strategies (kill/resume continues the same trajectory),
racing with several objectives, and the ``STORAGE/pareto/`` export."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from test_search import FakePool, Killed, make_config, make_driver, normalized_ledger, recipe_weights

from evolve.config import MO_STRATEGY_NAMES, config_hash, normalized_config
from evolve.pareto_export import PARETO_DIR, read_pareto
from evolve.protocols import HELD_OUT, Result
from evolve.racing import Bound, RaceJob, pareto_stop
from evolve.search.mo_strategies import ChebyshevCMAES
from evolve.search.objectives import Objectives, Told, dominates, hypervolume, non_dominated
from evolve.storage import RunStorage
from merge_core.errors import RecipeError
from merge_core.recipe import load_recipe

# Two conflicting tasks: t1 peaks at A, t2 at B (the weighted optimum, weight 0.7 on t1, is near A).
A = np.array([0.6, 0.6, -0.2, 0.6, 0.6, -0.2])
B = np.array([-0.2, 0.2, 0.6, -0.2, 0.2, 0.6])


def conflict_scores(recipe, task_set):
    w = np.asarray(recipe_weights(recipe))
    t1, t2 = math.exp(-float(np.sum((w - A) ** 2))), math.exp(-float(np.sum((w - B) ** 2)))
    if task_set == HELD_OUT:
        return {"h1": {"acc,none": 0.5 * (t1 + t2)}}
    return {"t1": {"acc,none": t1}, "t2": {"acc_norm,none": t2}}


class ConflictPool(FakePool):
    """FakePool with the two conflicting tasks."""

    def wait_any(self):
        if self.kill_after_results is not None and len(self.delivered) >= self.kill_after_results:
            raise Killed(f"after {len(self.delivered)} results")
        k = self.rng.randrange(len(self.in_flight)) if self.rng else 0
        eval_id, recipe, task_set = self.in_flight.pop(k)
        self.delivered.append(eval_id)
        return [Result(eval_id, scores=conflict_scores(recipe, task_set), worker=f"w{k}")]


def conflict_config(objectives=None, strategy=None, t2_min=None, **search):
    t2 = {"name": "t2", "weight": 0.3, "metric": "acc_norm,none"}
    if t2_min is not None:
        t2["min"] = t2_min
    if objectives:
        search["objectives"] = objectives
    if strategy:
        search["strategy"] = strategy
    return make_config(tasks=[{"name": "t1", "weight": 0.7}, t2], **({"search": search} if search else {}))


# -- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "where"), [
    ({"search": {"objectives": "pareto"}, "tasks": ["t1"]}, "search.objectives"),
    ({"search": {"objectives": "lexicographic"}}, "search.objectives"),
    ({"search": {"strategy": "nsga2"}}, "search.strategy"),
    ({"search": {"objectives": "pareto", "strategy": "cmaes"}}, "search.strategy"),
    ({"search": {"objectives": "pareto", "strategy": "mo-tpe", "initial_design": 4}}, "search.initial_design"),
    ({"search": {"objectives": "pareto", "initial_design": 4}}, "search.initial_design"),  # the default: mo-tpe
    ({"tasks": [{"name": "t1", "min": float("nan")}, "t2"]}, "tasks[0].min"),
    ({"tasks": [{"name": "t1", "min": "high"}, "t2"]}, "tasks[0].min"),
    ({"held_out": [{"name": "h1", "min": 0.5}]}, "held_out[0].min"),
])
def test_bad_objectives_and_floors_are_one_line_errors_naming_the_field(change, where):
    with pytest.raises(RecipeError) as info:
        make_config(**change)
    assert str(info.value).startswith(f"{where}:") and "\n" not in str(info.value)


def test_configs_without_the_new_fields_hash_as_before():
    plain = make_config()
    assert "min" not in normalized_config(plain)["tasks"][0]
    assert config_hash(plain) != config_hash(conflict_config(t2_min=0.5))
    assert "objectives" not in normalized_config(make_config(search={"strategy": "cmaes"}))["search"]


def test_the_cli_refuses_a_bad_objectives_field_with_exit_2(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump({"genome": {"models": ["a", "b"], "merge_method": "linear"},
                                      "tasks": ["t1"], "search": {"objectives": "pareto"}}))
    done = subprocess.run([sys.executable, "-m", "evolve.cli", str(config), "--storage-path", str(tmp_path / "s")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "search.objectives" in done.stderr
    assert not (tmp_path / "s").exists()


# -- the pieces ---------------------------------------------------------------------------------


def test_dominance_front_and_hypervolume():
    assert dominates((1, 1), (1, 0)) and not dominates((1, 0), (0, 1)) and not dominates((1, 1), (1, 1))
    assert non_dominated([(1, 0), (0, 1), (0.5, 0.5), (0.4, 0.4), (1, 0)]) == [0, 1, 2]
    assert hypervolume([(1, 0.5), (0.5, 1)], (0, 0)) == pytest.approx(0.75)
    assert hypervolume([(1, 1, 1)], (0, 0, 0)) == pytest.approx(1.0)
    # two boxes of 3D: 0.5*1*1 + 1*0.5*1 - overlap 0.5*0.5*1
    assert hypervolume([(0.5, 1, 1), (1, 0.5, 1)], (0, 0, 0)) == pytest.approx(0.75)
    assert hypervolume([(0.2, 0.2)], (0.5, 0)) == 0.0


def test_the_incremental_front_equals_the_whole_one_in_any_arrival_order():
    obj = Objectives(conflict_config(t2_min=0.2))
    rng = np.random.default_rng(0)
    records = []
    for seq in range(80):
        t1 = float(rng.choice([0.1, 0.3, 0.5, 0.7, 0.9]))  # a trade-off, with ties and dominated points
        t2 = round(1.0 - t1 - float(rng.choice([0.0, 0.1, 0.2])), 1)
        status = "ok" if seq % 11 else "failed"
        records.append({"kind": "train", "eval_id": f"c{seq}", "seq": seq, "recipe_hash": f"h{seq % 70}",
                        "cached_from": "c0" if seq >= 70 else None, "status": status, "fitness": t1 + t2,
                        "violation": max(0.2 - t2, 0.0), "scores": {"t1": {"acc,none": t1},
                                                                    "t2": {"acc_norm,none": t2}}})
    whole = [r["eval_id"] for r in obj.front(records)]
    assert 3 <= len(whole) < 20
    for order in range(3):
        front: list = []
        for i in rng.permutation(len(records)) if order else range(len(records)):
            front = obj.update_front(front, records[i])
        assert [r["eval_id"] for r in front] == whole


def test_infeasible_is_told_below_every_feasible_and_ranked_by_violation():
    obj = Objectives(conflict_config(t2_min=0.5))
    ok = {"status": "ok", "fitness": -0.9, "violation": 0.0}
    bad = {"status": "ok", "fitness": 0.9, "violation": 0.1}
    worse = {"status": "ok", "fitness": 0.95, "violation": 0.3}
    failed = {"status": "failed", "fitness": -2.0}
    told = [obj.told(r) for r in (ok, bad, worse, failed)]
    assert told == sorted(told, reverse=True) and len(set(told)) == 4
    assert obj.rank_key(ok) > obj.rank_key(bad) > obj.rank_key(worse)
    cheb = ChebyshevCMAES(None, seed=0, objectives=2)
    cheb.low, cheb.high = np.array([0.0, 0.0]), np.array([1.0, 1.0])
    values = cheb.scalarize([Told((0.0, 0.0), 0.0), Told((1.0, 1.0), 0.01), Told((1.0, 1.0), 0.5),
                             Told((-1.0, -1.0), 3.0, failed=True)], cheb.weights(0))
    assert values == sorted(values, reverse=True) and len(set(values)) == 4
    assert not np.allclose(cheb.weights(0), cheb.weights(1))


def _bound(highs):
    return Bound(0.0, 0.0, 0.0, {}, highs)


def test_racing_with_several_objectives_stops_only_dominated_or_infeasible_candidates():
    job = RaceJob(threshold=-9, reference_id="r", reference={}, reference_scores={}, weights={"a": 1, "b": 1},
                  front={"m1": {"a": 0.9, "b": 0.2}, "m2": {"a": 0.3, "b": 0.8}}, floors={"b": 0.25})
    assert pareto_stop(_bound({"a": 0.5, "b": 0.5}), job) is None  # could join the front
    assert pareto_stop(_bound({"a": 0.2, "b": 0.7}), job)["by"] == "m2"
    assert pareto_stop(_bound({"a": 0.99, "b": 0.2}), job) == {"why": "floor", "task": "b",
                                                               "highs": {"a": 0.99, "b": 0.2}}
    assert pareto_stop(_bound({"a": 0.9, "b": 0.5}), RaceJob(-9, "r", {}, {}, {"a": 1, "b": 1})) is None


# -- runs ---------------------------------------------------------------------------------------


def test_a_constrained_run_never_exports_an_infeasible_best(tmp_path):
    config = conflict_config(t2_min=0.5)
    make_driver(tmp_path, config=config, max_fevals=48).run(ConflictPool(order_seed=1))
    train = [r for r in RunStorage(tmp_path).load_evaluations() if r["kind"] == "train" and r["status"] == "ok"]
    feasible = [r for r in train if r["violation"] == 0]
    infeasible = [r for r in train if r["violation"] > 0]
    assert feasible and infeasible
    provenance = json.loads((tmp_path / "best_config.provenance.json").read_text())
    assert provenance["feasible"] is True and provenance["violation"] == 0
    best = next(r for r in train if r["eval_id"] == provenance["eval_id"])
    assert best["scores"]["t2"]["acc_norm,none"] >= 0.5
    assert best["fitness"] == max(r["fitness"] for r in feasible)
    # the floor binds: the unconstrained optimum of this run's candidates is infeasible
    assert max(r["fitness"] for r in infeasible) > best["fitness"]


def test_the_reports_rank_feasible_candidates_first_and_mark_the_others(tmp_path, capsys):
    from evolve.html_report import build_report
    from evolve.report import report, summarize

    # 3 of 48 candidates above the floor: infeasible ones reach both top lists (5 and 10 long)
    make_driver(tmp_path, config=conflict_config(t2_min=0.75), max_fevals=48).run(ConflictPool(order_seed=1))
    (tmp_path / "best_config.provenance.json").unlink()  # the reports' own ranking, not the incumbent's
    train = [r for r in RunStorage(tmp_path).load_evaluations() if r["kind"] == "train" and r["status"] == "ok"]
    feasible = max((r for r in train if r["violation"] == 0), key=lambda r: r["fitness"])
    assert max(r["fitness"] for r in train) > feasible["fitness"]  # the fittest is below the floor
    summary = summarize(tmp_path)
    popsize = RunStorage(tmp_path).read_manifest()["popsize"]  # whole generations, as the run's last line
    assert summary["generations"] * popsize + summary["partial_generation"] == len(train) == 48
    assert summary["partial_generation"] == 48 % popsize
    assert summary["best"]["eval_id"] == summary["top"][0]["eval_id"] == feasible["eval_id"]
    flags = [r["violation"] > 0 for r in summary["top"]]
    assert flags == sorted(flags)  # no infeasible one before a feasible one
    assert report(tmp_path) == 0
    ids = {r["eval_id"] for r in train}
    lines = [line for line in capsys.readouterr().out.splitlines() if line.split(" ", 1)[0] in ids]
    assert lines[0].startswith(feasible["eval_id"])
    assert any(flags) and any("below a floor by" in line for line in lines)
    page = build_report(tmp_path, live=False)
    top = page[page.index('data-table="top"'):]
    assert top.index(feasible["eval_id"]) < min(top.index(r["eval_id"]) for r in train if r["violation"] > 0
                                                 if r["eval_id"] in top)
    assert "below a floor by" in top


@pytest.mark.parametrize("strategy", MO_STRATEGY_NAMES)
def test_kill_and_resume_of_a_pareto_run_continues_the_same_trajectory(tmp_path, strategy):
    if strategy != "chebyshev-cmaes":
        pytest.importorskip("optuna")
    config = conflict_config("pareto", strategy)
    opts = {"config": config, "max_fevals": 30, "popsize": 5}
    make_driver(tmp_path / "ref", **opts).run(ConflictPool())
    for pool in (ConflictPool(order_seed=3, kill_after_results=7), ConflictPool(order_seed=4, kill_after_submits=9),
                 ConflictPool(order_seed=5)):
        try:
            make_driver(tmp_path / "run", **opts).run(pool)
        except Killed:
            continue
    assert normalized_ledger(tmp_path / "run") == normalized_ledger(tmp_path / "ref")
    run, ref = read_pareto(tmp_path / "run"), read_pareto(tmp_path / "ref")
    assert run["front"] == ref["front"] and run["hypervolume"] == ref["hypervolume"]
    assert sorted((tmp_path / "run" / PARETO_DIR).glob("*.yaml")) != []


def test_the_front_is_exported_with_held_out_scores(tmp_path):
    config = conflict_config("pareto", "chebyshev-cmaes")
    outcome = make_driver(tmp_path, config=config, max_fevals=36, schedule="async").run(ConflictPool(order_seed=2))
    summary = read_pareto(tmp_path)
    assert summary is not None and summary["objectives"] == ["t1", "t2"]
    front = summary["front"]
    assert len(front) >= 3, "two conflicting tasks should give a spread front"
    points = [tuple(m["train_scores"].values()) for m in front]
    assert non_dominated(points) == list(range(len(points)))
    ledger = RunStorage(tmp_path).load_evaluations()
    ok = [r for r in ledger if r["kind"] == "train" and r["status"] == "ok"]
    for r in ok:  # nothing evaluated is dominating a front member
        v = (r["scores"]["t1"]["acc,none"], r["scores"]["t2"]["acc_norm,none"])
        assert not any(dominates(v, p) for p in points)
    files = sorted(p.name for p in (tmp_path / PARETO_DIR).glob("*.yaml"))
    assert files == sorted(m["recipe"] for m in front)
    for member in front:
        assert member["held_out_scores"] and member["held_out_fitness"] is not None
        text = (tmp_path / PARETO_DIR / member["recipe"]).read_text()
        assert text.startswith("# merge-evolve Pareto front member") and member["eval_id"] in text
        load_recipe(tmp_path / PARETO_DIR / member["recipe"])  # a valid mergekit recipe
    held = {r["of"] for r in ledger if r["kind"] == "held_out"}
    assert {m["eval_id"] for m in front} <= held
    history = summary["hypervolume_history"]
    assert len(history) == outcome.candidates and summary["hypervolume"] == history[-1][1] > 0
    assert all(b[1] >= a[1] for a, b in zip(history, history[1:]))
    # best_config is the front's best weighted member
    provenance = json.loads((tmp_path / "best_config.provenance.json").read_text())
    assert provenance["eval_id"] == max(front, key=lambda m: m["train_fitness"])["eval_id"]


def test_a_pareto_run_defaults_to_mo_tpe_and_a_weighted_one_to_cmaes(tmp_path):
    pytest.importorskip("optuna")
    make_driver(tmp_path / "p", config=conflict_config("pareto"), max_fevals=8).run(ConflictPool())
    make_driver(tmp_path / "w", config=conflict_config(), max_fevals=8).run(ConflictPool())
    assert RunStorage(tmp_path / "p").read_manifest()["strategy"] == "mo-tpe"
    assert RunStorage(tmp_path / "w").read_manifest()["strategy"] == "cmaes"
    assert not (tmp_path / "w" / PARETO_DIR).exists()


def test_a_stale_front_member_file_is_removed(tmp_path):
    config = conflict_config("pareto", "chebyshev-cmaes")
    (tmp_path / PARETO_DIR).mkdir(parents=True)
    (tmp_path / PARETO_DIR / "c999999.yaml").write_text("stale")
    make_driver(tmp_path, config=config, max_fevals=12).run(ConflictPool())
    assert not (tmp_path / PARETO_DIR / "c999999.yaml").exists()


def test_the_reports_list_and_draw_the_front(tmp_path, capsys):
    from evolve.html_report import build_report
    from evolve.report import report

    make_driver(tmp_path, config=conflict_config("pareto", "chebyshev-cmaes", t2_min=0.2), max_fevals=24,
                schedule="async").run(ConflictPool(order_seed=1))
    front = read_pareto(tmp_path)["front"]
    assert report(tmp_path) == 0
    out = capsys.readouterr().out
    assert f"pareto front: {len(front)} members over t1, t2 (floors: t2 >= 0.2)" in out
    assert all(f"pareto/{m['recipe']}" in out for m in front)
    page = build_report(tmp_path, live=False)
    for name in ('data-figure="pareto"', 'data-figure="hypervolume"', 'data-table="pareto"'):
        assert name in page
    assert page.count("<svg") >= 2 and all(m["eval_id"] in page for m in front)
    weighted = tmp_path / "weighted"
    make_driver(weighted, config=conflict_config(), max_fevals=12).run(ConflictPool())
    assert 'data-figure="pareto"' not in build_report(weighted, live=False)
    assert report(weighted) == 0 and "pareto front" not in capsys.readouterr().out


@pytest.mark.parametrize("module", ["evolve.pareto_export", "evolve.report", "evolve.search.objectives",
                                    "evolve.html_report.pareto", "evolve.observers.pareto_log"])
def test_each_new_module_imports_first_in_a_fresh_process(module):
    """No import cycle through evolve.search's package face (the report imports the export first)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("sampler", ["mo-tpe", "nsga2", "tpe"])
def test_an_optuna_strategy_asked_the_same_point_twice_tells_both(sampler):
    """NSGA-II may propose a point twice (bench_pareto.py seed 4 did): each tell takes its own trial."""
    pytest.importorskip("optuna")
    from evolve.search.mo_strategies import OptunaMO
    from evolve.search.strategies import OptunaTPE

    kw = {"bounds": ([0.0, 0.0], [1.0, 1.0]), "popsize": 4, "seed": 0}
    s = OptunaTPE([0.5, 0.5], 0.2, scales=[1, 1], **kw) if sampler == "tpe" else \
        OptunaMO([0.5, 0.5], 0.2, objectives=2, sampler=sampler, **kw)
    s.study.enqueue_trial({"x0000": 0.5, "x0001": 0.5})
    a, b = s.ask(2)
    assert np.array_equal(a, b)
    told = [0.3, 0.4] if sampler == "tpe" else [Told((0.3, 0.1), 0.0), Told((0.4, 0.2), 0.0)]
    s.tell([a, b], told)
    assert len(s.pending) == 0 and len(s.study.trials) == 2
    assert all(t.state.name == "COMPLETE" for t in s.study.trials)
