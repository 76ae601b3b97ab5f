"""The Evaluator contract, run against every registered backend (like optuna's sampler tests).

Backends: ``hf`` everywhere; ``vllm`` where vLLM is installed (the vLLM venv: CI's vLLM step
runs this file there with ``REQUIRE_VLLM=1``, which turns the skip into a failure).  Each test
gets an evaluator started from the toy zoo's spatial expert and checks what the workers rely
on: finite per-task scores for every task of the list, the same scores for the same weights,
scores that follow weights written in place (the merger's path: the model's own parameters, or
``push_weights`` for engines that hold their own copy), task objects built once, and one-line
errors for an unknown task or metric.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from evolve.config import TaskConfig  # noqa: E402
from evolve.evaluation import EVALUATORS, EvalError, EvalSettings, evaluator_class, vllm_available  # noqa: E402

LIMIT = 40
TASKS = [TaskConfig(name="toy_spatial"), TaskConfig(name="toy_arith"), TaskConfig(name="toy_prompt_format")]


def _available(backend: str) -> None:
    if backend == "vllm" and not vllm_available():
        if os.environ.get("REQUIRE_VLLM") == "1":
            pytest.fail("REQUIRE_VLLM=1 but vLLM is not installed in this venv")
        pytest.skip("vLLM is not installed in this venv (run with .venv-vllm/bin/python)")


@pytest.fixture(scope="module", params=sorted(EVALUATORS))
def evaluator(request, zoo_dir: Path):
    _available(request.param)
    settings = EvalSettings(limit=LIMIT, device="cpu", builtin_tasks=False, batch_size=8, backend=request.param)
    with evaluator_class(request.param)(zoo_dir / "spatial", settings, threads=1) as ev:
        yield ev


def _weights(model_dir: Path) -> dict:
    from merge_core.tensor_io import CheckpointReader

    reader = CheckpointReader(model_dir)
    try:
        return {name: reader.read(name).clone() for name in reader.names()}
    finally:
        reader.close()


def _write(evaluator, weights: dict) -> None:
    """Put ``weights`` into the evaluator the way a worker does after a merge."""
    if evaluator.model is None:
        evaluator.push_weights(weights)
        return
    params = evaluator.model.state_dict()
    for name, tensor in weights.items():
        params[name].copy_(tensor)


def test_scores_every_task_with_finite_numbers(evaluator):
    result = evaluator.evaluate(TASKS)
    assert result.ok and result.error is None
    assert set(result.scores) == {t.name for t in TASKS}
    assert all(0.0 <= v <= 1.0 for v in result.scores.values())
    assert result.samples == {t.name: LIMIT for t in TASKS}
    assert result.fitness == pytest.approx(sum(result.scores.values()))


def test_the_expert_is_good_at_its_own_skill_only(evaluator):
    scores = evaluator.evaluate(TASKS).scores
    assert scores["toy_spatial"] >= 0.9 and scores["toy_arith"] <= 0.5


def test_same_weights_same_scores(evaluator):
    assert evaluator.evaluate(TASKS).scores == evaluator.evaluate(TASKS).scores


def test_scores_follow_weights_written_in_place(evaluator, zoo_dir):
    before = evaluator.evaluate(TASKS).scores
    _write(evaluator, _weights(zoo_dir / "arith"))
    try:
        swapped = evaluator.evaluate(TASKS).scores
        assert swapped["toy_arith"] >= 0.9 and swapped["toy_spatial"] < before["toy_spatial"] - 0.3
    finally:
        _write(evaluator, _weights(zoo_dir / "spatial"))
    assert evaluator.evaluate(TASKS).scores == before


def test_task_objects_are_built_once(evaluator):
    assert evaluator.task_set(TASKS) is evaluator.task_set(list(TASKS))


def test_unknown_task_is_a_one_line_error(evaluator):
    with pytest.raises(EvalError, match="unknown lm-eval task 'no_such_task_xyz'") as info:
        evaluator.evaluate([TaskConfig(name="no_such_task_xyz")])
    assert "\n" not in str(info.value)


def test_missing_metric_is_a_one_line_error_naming_the_available_ones(evaluator):
    with pytest.raises(EvalError, match=r"no metric 'bleu,none' \(available: acc,none") as info:
        evaluator.evaluate([TaskConfig(name="toy_arith", metric="bleu,none")])
    assert "\n" not in str(info.value)


def test_per_document_values_are_the_scores_and_a_subset_scores_the_same_documents(evaluator):
    # Racing (evolve/racing.py) scores chunks of documents and pairs them document by document:
    # each backend must give the same value to a document whether it is scored alone or with all.
    whole = evaluator.evaluate(TASKS, per_doc=True)
    for task in TASKS:
        values = whole.per_doc[task.name]
        assert sorted(values) == list(range(LIMIT))
        assert sum(values.values()) / LIMIT == pytest.approx(whole.scores[task.name], abs=1e-12)
    subset = {t.name: [3, 17, 0, 29] for t in TASKS}
    part = evaluator.evaluate(TASKS, samples=subset, per_doc=True)
    for task in TASKS:
        assert part.per_doc[task.name] == {d: whole.per_doc[task.name][d] for d in subset[task.name]}


def test_documents_asked_out_of_order_keep_their_own_values(evaluator):
    # A race asks for documents in a seeded order; lm-eval 0.4.13 names logged samples by their
    # position in the list given but scores them in dataset order. Two documents of different
    # values asked in descending order must keep their own values (fails without the sort).
    whole = evaluator.evaluate(TASKS, per_doc=True)
    checked = 0
    for task in TASKS:
        values = whole.per_doc[task.name]
        ones = [d for d, v in values.items() if v == 1.0]
        zeros = [d for d, v in values.items() if v == 0.0]
        if not ones or not zeros:
            continue
        docs = sorted([ones[0], zeros[0]], reverse=True)
        part = evaluator.evaluate([task], samples={task.name: docs}, per_doc=True)
        assert part.per_doc[task.name] == {d: values[d] for d in docs}
        checked += 1
    assert checked, "no task has documents of both values to tell apart"


def test_a_race_runs_on_the_backend_and_stops_a_weak_candidate(evaluator, zoo_dir):
    from evolve.racing import RaceJob
    from evolve.workers.race_eval import RaceEvaluation, race_plan

    tasks = TASKS[:2]
    orders, why = race_plan(tasks, evaluator.task_set(tasks), LIMIT, seed=5)
    assert why is None
    racer = RaceEvaluation(evaluator, tasks, orders)
    full = racer.full()
    assert full.scores == pytest.approx(evaluator.evaluate(tasks).scores, abs=1e-12)
    job = RaceJob(threshold=sum(full.scores.values()), reference_id="spatial", reference=full.per_doc,
                  reference_scores=full.scores, weights={t.name: 1.0 for t in tasks})
    _write(evaluator, _weights(zoo_dir / "base"))
    try:
        weak = racer.race(job)
    finally:
        _write(evaluator, _weights(zoo_dir / "spatial"))
    assert weak.race["stopped"] and weak.documents < 2 * LIMIT and weak.race["high"] < job.threshold
