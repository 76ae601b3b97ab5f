"""Racing on documents: the paired bound, the worker's chunked scoring, and the driver's use of it.

The math on hand-made per-document values; the worker side on the toy zoo's real evaluator
(a weak model raced against an expert stops early; the expert against itself runs to the end
with lm-eval's own scores); the driver with a fake pool whose candidates answer each document
with a probability given by their distance to a target (so a race has something to decide).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_search import FakePool, Killed, fake_scores, make_driver

from evolve.protocols import HELD_OUT, TRAIN, Result
from evolve.racing import (
    RaceJob,
    chunk_ends,
    decode_values,
    doc_order,
    encode_values,
    fitness_interval,
    paired_bound,
)
from evolve.search.driver import RaceSettings
from evolve.storage import RunStorage, StorageError
from evolve.workers.race_eval import RaceEvaluation

# -- the math ------------------------------------------------------------------------------


def test_doc_order_is_a_seeded_permutation_and_chunks_end_with_everything():
    order = doc_order(200, 7, "toy_arith")
    assert sorted(order) == list(range(200)) and order == doc_order(200, 7, "toy_arith")
    assert order != doc_order(200, 8, "toy_arith") and order != doc_order(200, 7, "toy_spatial")
    assert chunk_ends(200, (0.125, 0.25, 0.5)) == [25, 50, 100, 200]
    assert chunk_ends(3, (0.125, 0.25, 0.5)) == [1, 2, 3]


def _job(reference, threshold, weights=None):
    weights = weights or {t: 1.0 for t in reference}
    return RaceJob(threshold=threshold, reference_id="ref", reference=reference,
                   reference_scores={t: float(np.mean(v)) for t, v in reference.items()}, weights=weights)


def test_the_paired_bound_is_exact_for_the_reference_itself_and_sure_of_a_clear_loser():
    rng = np.random.default_rng(0)
    ref = {"a": list(rng.integers(0, 2, 200).astype(float)), "b": list(rng.integers(0, 2, 200).astype(float))}
    full = sum(np.mean(v) for v in ref.values())
    same = paired_bound({t: v[:50] for t, v in ref.items()}, _job(ref, full))
    assert same.estimate == pytest.approx(full) and same.low < full < same.high
    loser = {t: [0.0] * 50 for t in ref}  # answers nothing where the reference answers half
    bound = paired_bound(loser, _job(ref, full))
    assert bound.high < full - 0.3 and bound.scores["a"] == pytest.approx(np.mean(ref["a"]) - np.mean(ref["a"][:50]))
    everything = paired_bound({t: list(v) for t, v in ref.items()}, _job(ref, full))
    assert everything.low == everything.high == pytest.approx(full)  # nothing left to be unsure about


def test_a_few_equal_answers_are_no_proof():
    ref = {"a": [1.0] * 100}
    early = paired_bound({"a": [1.0] * 4}, _job(ref, 1.0))
    assert early.high - early.low > 0.3  # the pseudo-document keeps the interval open


def test_values_round_trip_compactly():
    bits = [1.0, 0.0, 1.0, 1.0, 0.0] * 40
    text = encode_values(bits)
    assert text.startswith("b200:") and len(text) < 50 and decode_values(text) == bits
    floats = [0.25, 1.0, 0.0, 0.3333]
    assert decode_values(encode_values(floats)) == floats
    lo, hi = fitness_interval({"a": bits}, {"a": 1.0})
    assert lo < np.mean(bits) < hi and hi - lo < 0.2


# -- the worker side, on the real evaluator --------------------------------------------------


@pytest.fixture(scope="module")
def zoo_racer(zoo_dir: Path):
    pytest.importorskip("lm_eval")
    import torch

    from evolve.config import TaskConfig
    from evolve.evaluation import EvalSettings
    from evolve.evaluation.hf import HFEvaluator
    from evolve.workers.race_eval import race_plan

    torch.set_num_threads(1)
    tasks = [TaskConfig(name="toy_spatial"), TaskConfig(name="toy_arith")]
    evaluator = HFEvaluator(zoo_dir / "spatial", EvalSettings(device="cpu", builtin_tasks=False, limit=64), threads=1)
    orders, why = race_plan(tasks, evaluator.task_set(tasks), 64, seed=3)
    assert why is None and {len(o) for o in orders.values()} == {64}
    yield evaluator, tasks, RaceEvaluation(evaluator, tasks, orders)
    evaluator.close()


def _load(evaluator, model_dir: Path) -> None:
    from merge_core.tensor_io import CheckpointReader

    reader = CheckpointReader(model_dir)
    params = evaluator.model.state_dict()
    for name in reader.names():
        params[name].copy_(reader.read(name))
    reader.close()


def test_scoring_everything_matches_lm_eval_and_a_weak_candidate_stops_early(zoo_racer, zoo_dir):
    evaluator, tasks, racer = zoo_racer
    _load(evaluator, zoo_dir / "spatial")
    full = racer.full()
    plain = evaluator.evaluate(tasks).scores
    assert full.scores == pytest.approx(plain, abs=1e-12) and full.documents == full.documents_full == 128
    job = RaceJob(threshold=sum(full.scores.values()), reference_id="spatial", reference=full.per_doc,
                  reference_scores=full.scores, weights={t.name: 1.0 for t in tasks})
    itself = racer.race(job)
    assert not itself.race["stopped"] and itself.scores == pytest.approx(full.scores) and itself.per_doc
    _load(evaluator, zoo_dir / "base")
    try:
        weak = racer.race(job)
    finally:
        _load(evaluator, zoo_dir / "spatial")
    assert weak.race["stopped"] and weak.documents < 64 and weak.per_doc is None
    assert weak.race["high"] < job.threshold and weak.scores["toy_spatial"] < full.scores["toy_spatial"] - 0.3


# -- the driver side, with a fake pool that answers per document --------------------------------


def _p(recipe, task):
    """The chance to answer a document right: the fake objective's per-task score."""
    return fake_scores(recipe, TRAIN)[task]["acc,none" if task == "t1" else "acc_norm,none"]


class DocEvaluator:
    """Answers document d of task t with 1 when a hash of (t, d) falls below the candidate's p."""

    def __init__(self):
        self.recipe = None
        self.documents = 0

    def evaluate(self, tasks, *, samples=None, per_doc=False):
        from evolve.evaluation import EvalResult

        values = {}
        for task, docs in samples.items():
            p = _p(self.recipe, task)
            values[task] = {d: float(int(hashlib.sha256(f"{task}{d}".encode()).hexdigest(), 16) % 1000 < p * 1000)
                            for d in docs}
            self.documents += len(docs)
        return EvalResult(scores={t: float(np.mean(list(v.values()))) for t, v in values.items()}, fitness=None,
                          seconds=0.0, per_doc=values)


class RacingPool(FakePool):
    """FakePool whose train jobs are scored through the worker's RaceEvaluation."""

    def __init__(self, *args, docs=200, **kw):
        super().__init__(*args, **kw)
        self.evaluator = DocEvaluator()
        tasks = [type("T", (), {"name": n, "metric": "acc,none"})() for n in ("t1", "t2")]
        self.racer = RaceEvaluation(self.evaluator, tasks, {n: doc_order(docs, 0, n) for n in ("t1", "t2")})
        self.races = {}

    def submit(self, eval_id, recipe, task_set, race=None):
        super().submit(eval_id, recipe, task_set)
        self.races[eval_id] = race

    def wait_any(self):
        (res,) = super().wait_any()
        if res.eval_id.endswith(HELD_OUT):
            return [res]
        recipe = next(r for i, r, _ in self.done if i == res.eval_id)
        self.evaluator.recipe = recipe
        race = self.races.pop(res.eval_id)
        out = self.racer.race(race) if race is not None else self.racer.full()
        return [Result(res.eval_id, scores=dict(out.scores),  # flat, as real workers report them
                       worker="w", documents=out.documents, documents_full=out.documents_full,
                       per_doc=out.per_doc, race=out.race)]


@pytest.fixture(autouse=True)
def _remember_recipes(monkeypatch):
    """FakePool forgets a job's recipe once it is done; RacingPool needs it after super().wait_any()."""
    original = FakePool.wait_any

    def wait_any(self):
        if not hasattr(self, "done"):
            self.done = []
        self.done.extend(self.in_flight)
        return original(self)

    monkeypatch.setattr(FakePool, "wait_any", wait_any)


def _race_driver(path, **kw):
    from test_search import make_config

    config = make_config(tasks=[{"name": "t1", "weight": 0.4}, {"name": "t2", "weight": 0.6}])
    kw.setdefault("racing", RaceSettings())
    return make_driver(path, config=config, schedule="async", max_fevals=60, **kw)


def test_the_driver_races_against_the_incumbent_and_never_crowns_an_estimate(tmp_path):
    pool = RacingPool(num_workers=3, order_seed=1)
    outcome = _race_driver(tmp_path).run(pool)
    train = [r for r in RunStorage(tmp_path).load_evaluations() if r["kind"] == "train"]
    stopped = [r for r in train if (r.get("race") or {}).get("stopped")]
    assert stopped, "no candidate was stopped early"
    assert all("per_doc" not in r and r["documents"] < r["documents_full"] for r in stopped)
    assert all(r["race"]["high"] < r["race"]["threshold"] for r in stopped)
    assert "per_doc" in outcome.best and not outcome.best.get("race", {}).get("stopped")
    scored = sum(r["documents"] for r in train) / sum(r["documents_full"] for r in train)
    assert scored < 0.9
    first_batch = [r for r in train if r["generation"] == 0]
    assert all("race" not in r for r in first_batch)  # nothing to race against before the first tell


def test_a_raced_run_resumes(tmp_path):
    with pytest.raises(Killed):
        _race_driver(tmp_path).run(RacingPool(num_workers=3, order_seed=2, kill_after_results=23))
    _race_driver(tmp_path).run(RacingPool(num_workers=3, order_seed=3))
    ids = [r["eval_id"] for r in RunStorage(tmp_path).load_evaluations() if r["kind"] == "train"]
    assert len(ids) == len(set(ids)) == 60


def test_without_racing_every_document_is_scored(tmp_path):
    from test_search import make_config

    config = make_config(tasks=[{"name": "t1", "weight": 0.4}, {"name": "t2", "weight": 0.6}])
    pool = RacingPool(num_workers=3, order_seed=1)
    make_driver(tmp_path, config=config, schedule="async", max_fevals=30).run(pool)
    assert pool.evaluator.documents == 30 * 400 and all(r is None for r in pool.races.values())
    assert math.isclose(pool.evaluator.documents / 400, 30)


@pytest.mark.parametrize("level", ["incumbent", "cut"])
def test_the_level_a_race_must_reach(tmp_path, level):
    _race_driver(tmp_path, racing=RaceSettings(level=level)).run(RacingPool(num_workers=3, order_seed=4))
    ledger = {r["eval_id"]: r for r in RunStorage(tmp_path).load_evaluations() if r["kind"] == "train"}
    raced = [r for r in ledger.values() if "race" in r and r.get("cached_from") is None]
    assert raced
    for r in raced:
        reference = ledger[r["race"]["reference"]]
        if level == "incumbent":
            assert r["race"]["threshold"] == reference["fitness"]
        else:
            assert r["race"]["threshold"] <= reference["fitness"]


def test_racing_confidence_comes_from_the_config_else_the_stored_run_else_the_default(tmp_path):
    from test_search import make_config

    from evolve.config import racing_confidence_of
    from evolve.racing import DEFAULT_Z, LEGACY_Z

    plain, explicit = make_config(), make_config(search={"racing_confidence": 3.0})
    assert racing_confidence_of(plain, None) == DEFAULT_Z == 1.0
    assert racing_confidence_of(explicit, {"racing_confidence": 1.0}) == 3.0
    assert racing_confidence_of(plain, {"racing_confidence": 1.5}) == 1.5
    assert racing_confidence_of(plain, {"seed": 0}) == LEGACY_Z == 2.0  # stored before it was recorded
    make_driver(tmp_path, config=make_config(search={"strategy": "cmaes"}), schedule="async",
                racing=RaceSettings(), max_fevals=6).run(RacingPool())
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert manifest["racing_confidence"] == 1.0 and manifest["config"]["search"]["racing_confidence"] == 1.0


def test_a_run_stored_before_the_default_changed_resumes_at_its_confidence(tmp_path):
    """A manifest of the previous version: no racing_confidence, no initial_design (it had no
    design), and its config's search section recorded the default of then (2.0).  Resumed with the
    same config file, it passes the resume check and keeps racing at 2.0, also on later resumes."""
    from test_search import make_config

    from evolve.config import racing_confidence_of

    old = make_config(search={"strategy": "cmaes", "initial_design": 0})
    with pytest.raises(Killed):
        make_driver(tmp_path, config=old, schedule="async", racing=RaceSettings(z=2.0), max_fevals=30,
                    ).run(RacingPool(num_workers=3, order_seed=2, kill_after_results=8))
    manifest = json.loads((tmp_path / "run.json").read_text())
    del manifest["racing_confidence"], manifest["initial_design"], manifest["config"]["search"]["initial_design"]
    manifest["config"]["search"]["racing_confidence"] = 2.0
    (tmp_path / "run.json").write_text(json.dumps(manifest))
    config = make_config(search={"strategy": "cmaes"})  # the user's file, unchanged
    z = racing_confidence_of(config, manifest)
    assert z == 2.0
    driver = make_driver(tmp_path, config=config, schedule="async", racing=RaceSettings(z=z), max_fevals=30)
    driver.check_stored_run()
    assert driver.run(RacingPool(num_workers=3, order_seed=3)).candidates == 30
    resumed = json.loads((tmp_path / "run.json").read_text())
    assert resumed["racing_confidence"] == 2.0 and resumed["initial_design"] == 0
    assert racing_confidence_of(config, resumed) == 2.0
    with pytest.raises(StorageError, match="racing_confidence differs"):
        make_driver(tmp_path, config=make_config(search={"strategy": "cmaes", "racing_confidence": 1.0}),
                    schedule="async", max_fevals=40).check_stored_run()


def test_a_pareto_run_stops_only_candidates_a_front_member_dominates_or_a_floor_excludes(tmp_path):
    from test_search import make_config

    config = make_config(tasks=[{"name": "t1", "weight": 0.4}, {"name": "t2", "weight": 0.6, "min": 0.3}],
                         search={"objectives": "pareto"})
    make_driver(tmp_path, config=config, schedule="async", max_fevals=60,
                racing=RaceSettings()).run(RacingPool(num_workers=3, order_seed=1))
    ledger = {r["eval_id"]: r for r in RunStorage(tmp_path).load_evaluations() if r["kind"] == "train"}
    stopped = [r for r in ledger.values() if (r.get("race") or {}).get("stopped") and r.get("cached_from") is None]
    assert stopped, "no candidate was stopped early"
    for r in stopped:
        race = r["race"]
        assert race["why"] in ("dominated", "floor")  # never the weighted threshold
        if race["why"] == "floor":
            assert race["highs"][race["task"]] < 0.3
        else:
            member = ledger[race["by"]]
            assert "per_doc" in member and all(member["scores"][t] > h for t, h in race["highs"].items())
