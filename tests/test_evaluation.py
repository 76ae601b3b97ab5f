"""HFEvaluator against lm-eval itself, on tiny random models whose tokenizer reads the toy tasks.

The tokenizer is a byte-level BPE trained here on the toy tasks' text (the word-level tokenizer
of ``tiny_models`` maps most of it to <unk>, which would make every model score alike).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tiny_models import make_tiny_llama

lm_eval = pytest.importorskip("lm_eval")

from evolve.config import TaskConfig  # noqa: E402
from evolve.evaluation import EvalError, EvalSettings, default_task_dir, score_tasks  # noqa: E402
from evolve.evaluation.hf import HFEvaluator  # noqa: E402

TOY = [TaskConfig(name="toy_spatial"), TaskConfig(name="toy_arith"), TaskConfig(name="toy_prompt_format")]
VOCAB = 320


def _train_bpe(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = []
    for path in sorted((default_task_dir() / "data").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            corpus.extend(str(v) for v in json.loads(line).values())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(out))


@pytest.fixture(scope="module")
def bpe_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny random Llamas (``x``, ``y``) of one shape, with a BPE tokenizer for the toy text."""
    root = tmp_path_factory.mktemp("bpe_models")
    out = {}
    for name, seed in (("x", 11), ("y", 12)):
        path = make_tiny_llama(root / name, seed=seed, tokenizer=False, vocab_size=VOCAB)
        _train_bpe(path)
        out[name] = path
    return out


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two spinning OpenMP threads per matmul
    made these tiny forwards ~40x slower.  Restored afterwards (it is process-wide)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _settings(**kw) -> EvalSettings:
    base = dict(limit=40, batch_size=8, device="cpu", builtin_tasks=False)
    return EvalSettings(**{**base, **kw})


def _simple_evaluate(model_dir: Path, names: list[str], *, limit, num_fewshot=None, batch_size=8) -> dict:
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=[str(default_task_dir())], include_defaults=False)
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": "float32", "device": "cpu"},
        tasks=names,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        task_manager=tm,
        log_samples=False,
        random_seed=1234,
        numpy_random_seed=1234,
        torch_random_seed=1234,
        fewshot_random_seed=1234,
    )
    return out["results"]


@pytest.mark.slow
@pytest.mark.parametrize("num_fewshot", [None, 2])
def test_scores_equal_simple_evaluate(bpe_models, num_fewshot):
    ev = HFEvaluator(bpe_models["x"], _settings(num_fewshot=num_fewshot))
    first = ev.evaluate(TOY)
    second = ev.evaluate(TOY)  # cached task objects: the few-shot sampler must be re-seeded
    reference = _simple_evaluate(bpe_models["x"], [t.name for t in TOY], limit=40, num_fewshot=num_fewshot)
    expected = {t.name: reference[t.name]["acc,none"] for t in TOY}
    assert first.scores == expected
    assert second.scores == expected
    assert first.ok and first.fitness == sum(expected.values())
    # Chance level is 0.25 on two tasks, 0.2 on the third: a model stuck at one answer would
    # not tell the paths apart, so make sure the scores are not all identical.
    assert len(set(expected.values())) > 1


@pytest.mark.slow
def test_in_place_overwrite_rescores(bpe_models):
    ev = HFEvaluator(bpe_models["x"], _settings())
    before = ev.evaluate(TOY)
    y_state = HFEvaluator(bpe_models["y"], _settings()).model.state_dict()
    x_state = {k: v.clone() for k, v in ev.model.state_dict().items()}
    with torch.no_grad():
        for name, tensor in ev.model.state_dict().items():
            tensor.copy_(y_state[name])
    after = ev.evaluate(TOY)
    fresh_y = HFEvaluator(bpe_models["y"], _settings()).evaluate(TOY)
    assert after.scores != before.scores
    assert after.scores == fresh_y.scores
    with torch.no_grad():
        for name, tensor in ev.model.state_dict().items():
            tensor.copy_(x_state[name])
    assert ev.evaluate(TOY).scores == before.scores


def test_limit_respected(bpe_models):
    ev = HFEvaluator(bpe_models["x"], _settings(limit=7))
    result = ev.evaluate([TaskConfig(name="toy_arith")])
    assert result.samples == {"toy_arith": 7}
    ev = HFEvaluator(bpe_models["x"], _settings(limit=0.05))  # a fraction, as in lm-eval
    assert ev.evaluate([TaskConfig(name="toy_arith")]).samples == {"toy_arith": 10}


def test_unknown_task_one_line_error(bpe_models):
    ev = HFEvaluator(bpe_models["x"], _settings())
    with pytest.raises(EvalError) as info:
        ev.evaluate([TaskConfig(name="toy_arith"), TaskConfig(name="no_such_task_xyz")])
    message = str(info.value)
    assert "no_such_task_xyz" in message and str(default_task_dir()) in message
    assert "\n" not in message


@pytest.mark.slow
def test_unknown_task_after_builtin_fallback(bpe_models):
    ev = HFEvaluator(bpe_models["x"], _settings(builtin_tasks=True))
    with pytest.raises(EvalError, match="no_such_task_xyz.*built-in"):
        ev.evaluate([TaskConfig(name="no_such_task_xyz")])


def test_missing_metric_names_available(bpe_models):
    ev = HFEvaluator(bpe_models["x"], _settings(limit=5))
    with pytest.raises(EvalError) as info:
        ev.evaluate([TaskConfig(name="toy_arith", metric="acc_norm,none")])
    message = str(info.value)
    assert "'acc_norm,none'" in message and "acc,none" in message and "toy_arith" in message
    assert "_stderr" not in message


def test_fitness_is_plain_weighted_sum(bpe_models):
    ev = HFEvaluator(bpe_models["x"], _settings(limit=20))
    tasks = [TaskConfig(name="toy_arith", weight=2.0), TaskConfig(name="toy_spatial", weight=0.5)]
    result = ev.evaluate(tasks)
    arith, spatial = result.scores["toy_arith"], result.scores["toy_spatial"]
    assert result.fitness == 2.0 * arith + 0.5 * spatial
    assert result.seconds > 0


def test_group_task_scores_mean_of_members(bpe_models):
    ev = HFEvaluator(bpe_models["x"], _settings(limit=20))
    result = ev.evaluate([TaskConfig(name="toy_all")])
    members = [result.metrics[t.name]["acc,none"] for t in TOY]
    assert result.scores["toy_all"] == pytest.approx(sum(members) / 3)
    assert result.samples == {t.name: 20 for t in TOY}


def test_score_tasks_weights_duplicates_and_nan():
    results = {
        "a": {"alias": "a", "sample_len": 4, "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.75},
        "b": {"acc,none": 0.25},
    }
    tasks = [
        TaskConfig(name="a", weight=2.0),
        TaskConfig(name="a", weight=1.0, metric="acc_norm,none"),
        SimpleNamespace(name="b", weight=4.0, metric="acc,none", split=None),  # any TaskLike
    ]
    scored = score_tasks(tasks, results)
    assert scored.scores == {"a:acc,none": 0.5, "a:acc_norm,none": 0.75, "b": 0.25}
    assert scored.fitness == 2.0 * 0.5 + 0.75 + 4.0 * 0.25
    assert scored.metrics["a"] == {"acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.75}
    results["b"]["acc,none"] = float("nan")
    failed = score_tasks(tasks, results)
    assert not failed.ok and failed.fitness is None and "'b'" in failed.error
    assert math.isnan(failed.scores["b"])
    with pytest.raises(EvalError, match="'c' has no results"):
        score_tasks([TaskConfig(name="c")], results)


def _write_split_task(root: Path) -> Path:
    """A local task whose dataset has a 12-doc test split and a 5-doc validation split."""
    root.mkdir(parents=True, exist_ok=True)
    for split, count, offset in (("test", 12, 0), ("validation", 5, 50)):
        rows = [
            {"question": f"{i}+{i + 1}=", "choices": [str(2 * i + 1), str(2 * i + 3)], "answer": 0}
            for i in range(offset, offset + count)
        ]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    body = (
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {root / 'test.jsonl'}\n"
        f"    validation: {root / 'validation.jsonl'}\n"
        "output_type: multiple_choice\n"
        "doc_to_text: question\n"
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
    )
    (root / "split_task.yaml").write_text("task: split_task\ntest_split: test\n" + body)
    (root / "split_task_val.yaml").write_text("task: split_task_val\ntest_split: validation\n" + body)
    return root


def test_split_override(bpe_models, tmp_path):
    tasks_dir = _write_split_task(tmp_path / "tasks")
    ev = HFEvaluator(bpe_models["x"], _settings(limit=None, task_search_paths=(tasks_dir,)))
    plain = ev.evaluate([TaskConfig(name="split_task")])
    override = ev.evaluate([TaskConfig(name="split_task", split="validation")])
    declared = ev.evaluate([TaskConfig(name="split_task_val")])
    assert plain.samples == {"split_task": 12}
    assert override.samples == {"split_task": 5}
    assert override.scores["split_task"] == declared.scores["split_task_val"]
    assert ev.evaluate([TaskConfig(name="split_task")]).scores == plain.scores  # the override did not leak
    with pytest.raises(EvalError, match="no split 'train'.*test, validation"):
        ev.evaluate([TaskConfig(name="split_task", split="train")])
    with pytest.raises(EvalError, match="two splits"):
        ev.evaluate([TaskConfig(name="split_task"), TaskConfig(name="split_task", split="validation")])


def test_quiet_prints_no_progress_bars(bpe_models, capsys):
    ev = HFEvaluator(bpe_models["x"], _settings(limit=10))
    capsys.readouterr()
    ev.evaluate(TOY)
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "it/s" not in captured.err, captured.err[:300]
    assert captured.out == ""


def test_chat_template_required_when_requested(bpe_models):
    with pytest.raises(EvalError, match="no chat template"):
        HFEvaluator(bpe_models["x"], _settings(apply_chat_template=True))


def test_settings_from_config():
    config = SimpleNamespace(limit=50, num_fewshot=1, shuffle=True, apply_chat_template=False,
                             fewshot_as_multiturn=False, random_init=False)
    settings = EvalSettings.from_config(config, batch_size=4)
    assert (settings.limit, settings.num_fewshot, settings.shuffle, settings.batch_size) == (50, 1, True, 4)
    assert settings.resolved_dtype() == (torch.float32 if settings.resolved_device().type == "cpu" else torch.bfloat16)
    with pytest.raises(TypeError, match="nope"):
        EvalSettings.from_config(config, nope=1)
