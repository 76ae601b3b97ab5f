"""The vLLM evaluator on the toy zoo: same scores as the HF evaluator, in-place weight pushes.

Run with the vLLM venv (``bash scripts/setup_vllm.sh`` builds it; CPU build of vLLM):

    TOY_ZOO_DIR=$PWD/zoo .venv-vllm/bin/python -m pytest tests/test_vllm_evaluator.py

(TOY_ZOO_DIR: reuse a built zoo, see ``zoo_root``; without it the zoo is built first, minutes.)

In a venv without vLLM the engine tests skip (``REQUIRE_VLLM=1`` makes them fail instead); the
engine-settings and CLI tests at the top run anywhere.

Bars: (1) vLLM scores of zoo models equal the HF evaluator's; (2) pushing arith's weights into an
engine started from spatial scores exactly like an engine started from arith; (3) a
generate_until task works; (4) pushing the original weights back restores the original scores
and outputs (the prefix cache serves nothing stale); plus a whole ``merge-evolve --vllm`` run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from evolve.evaluation import VLLM_MISSING, vllm_available
from evolve.evaluation.vllm import engine_kwargs

REPO = Path(__file__).resolve().parents[1]
TASK_DIR = REPO / "tests" / "data" / "vllm_tasks"  # toy_arith_gen (generate_until)
TOY_CONFIG = REPO / "configs" / "toy.yml"
LIMIT = 50


@pytest.fixture(scope="session")
def need_vllm() -> None:
    """Skip (or, with REQUIRE_VLLM=1, fail) when vLLM is not installed in this venv.

    Session-scoped, so pytest sets it up before the session-scoped ``toy_zoo`` (a zoo build
    takes minutes) when both are requested.
    """
    if vllm_available():
        return
    message = f"{VLLM_MISSING} (run these tests with .venv-vllm/bin/python)"
    if os.environ.get("REQUIRE_VLLM") == "1":
        pytest.fail(f"REQUIRE_VLLM=1: {message}")
    pytest.skip(message)


# -- anywhere: engine settings and the CLI's refusal ----------------------------------------


def _settings(**kw):
    from evolve.evaluation import EvalSettings

    base = dict(limit=LIMIT, device="cpu", builtin_tasks=False, task_search_paths=(TASK_DIR,))
    return EvalSettings(**{**base, **kw})


def test_engine_kwargs_follow_the_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 256}))
    kw = engine_kwargs(tmp_path, _settings(seed=5))
    # Defaults: float32 on CPU, eager, 4096 capped at the model's 256, the push extension.
    assert kw["dtype"] == "float32" and kw["enforce_eager"] is True and kw["max_model_len"] == 256
    assert kw["worker_extension_cls"] == "evolve.evaluation.vllm_worker_ext.WeightPush"
    assert kw["seed"] == 5 and kw["batch_size"] == "auto" and "max_num_seqs" not in kw
    kw = engine_kwargs(tmp_path, _settings(dtype="bf16", vllm={"max_model_len": 128, "max_num_seqs": 8,
                                                               "batch_size": 32, "dtype": None}))
    assert (kw["dtype"], kw["max_model_len"], kw["max_num_seqs"], kw["batch_size"]) == ("bfloat16", 128, 8, 32)
    assert engine_kwargs(tmp_path, _settings(vllm={"dtype": "half"}))["dtype"] == "float16"


def test_engine_kwargs_refuse_what_cannot_work(tmp_path: Path) -> None:
    from evolve.evaluation import EvalError

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EvalError, match="tensor_parallel_size must be 1"):
        engine_kwargs(tmp_path, _settings(vllm={"tensor_parallel_size": 2}))
    with pytest.raises(EvalError, match="unknown vllm engine setting"):
        engine_kwargs(tmp_path, _settings(vllm={"swap_space": 4}))


def test_cli_without_vllm_is_one_line(monkeypatch, tmp_path: Path, capsys) -> None:
    import evolve.flag_checks
    from evolve.cli import main as merge_evolve

    monkeypatch.setattr(evolve.flag_checks, "vllm_available", lambda: False)
    assert merge_evolve([str(TOY_CONFIG), "--storage-path", str(tmp_path / "run"), "--vllm", "--no-ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"merge-evolve: error: --vllm: {VLLM_MISSING}"


# -- with vLLM: the engine ------------------------------------------------------------------

def _tasks():
    from evolve.config import TaskConfig

    return [TaskConfig(name="toy_spatial"), TaskConfig(name="toy_arith"), TaskConfig(name="toy_prompt_format"),
            TaskConfig(name="toy_arith_gen", metric="exact_match,none")]


@pytest.fixture(scope="session")
def zoo_root(need_vllm, zoo_dir: Path) -> Path:
    """A complete toy zoo (tests/zoo_fixture.py's ``zoo_dir``), only where vLLM is installed."""
    return zoo_dir


@pytest.fixture(scope="module")
def hf_scores(zoo_root: Path) -> dict[str, dict[str, float]]:
    """The HF evaluator's scores of the spatial and arith experts (the reference)."""
    from evolve.evaluation.hf import HFEvaluator

    out = {}
    for name in ("spatial", "arith"):
        with HFEvaluator(zoo_root / name, _settings(threads=1)) as hf:
            out[name] = hf.evaluate(_tasks()).scores
    return out


@pytest.fixture(scope="module")
def arith_engine(zoo_root: Path):
    from evolve.evaluation.vllm import VLLMEvaluator

    with VLLMEvaluator(zoo_root / "arith", _settings(), threads=1) as evaluator:
        yield evaluator


@pytest.fixture(scope="module")
def spatial_engine(zoo_root: Path):
    from evolve.evaluation.vllm import VLLMEvaluator

    with VLLMEvaluator(zoo_root / "spatial", _settings(), threads=1) as evaluator:
        yield evaluator


def _long_prompts() -> list[str]:
    """Three prompts of ~160 tokens: longer than one KV block (128 tokens on CPU, 16 on GPUs),
    so after a first run the engine's prefix cache holds a block of each (shorter prompts never
    hit the cache, and prompt-logprob requests skip it)."""
    lines = (REPO / "eval_tasks" / "data" / "toy_spatial_search.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines[:36]]
    return [" ".join(r["story"] for r in rows[i : i + 12]) + "\n" + rows[i]["question"] for i in (0, 12, 24)]


def _probe(evaluator) -> tuple[list[tuple[str, float]], int]:
    """Greedy completions of the long prompts with their logprobs, and how many prompt tokens
    the engine served from its prefix cache."""
    from vllm import SamplingParams, TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=evaluator.tokenizer(p).input_ids) for p in _long_prompts()]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=0)
    outputs = evaluator.llm.generate(prompts, params, use_tqdm=False)
    completions = [(o.outputs[0].text, o.outputs[0].cumulative_logprob) for o in outputs]
    return completions, sum(o.num_cached_tokens or 0 for o in outputs)


def _same(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> bool:
    return [t for t, _ in a] == [t for t, _ in b] and all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a, b))


def _state_dict(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _close(a: dict[str, float], b: dict[str, float], tol: float = 0.01) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= tol for k in a)


def test_scores_equal_the_hf_evaluator(spatial_engine, arith_engine, hf_scores) -> None:
    # (1), and (3): toy_arith_gen is a generate_until task; the arith expert gets some sums right.
    for name, engine in (("spatial", spatial_engine), ("arith", arith_engine)):
        result = engine.evaluate(_tasks())
        assert result.ok and _close(result.scores, hf_scores[name]), (name, result.scores, hf_scores[name])
        assert result.samples == {"toy_spatial": LIMIT, "toy_arith": LIMIT, "toy_prompt_format": LIMIT,
                                  "toy_arith_gen": LIMIT}
    assert hf_scores["arith"]["toy_arith_gen"] > 0.05 and hf_scores["spatial"]["toy_arith"] < 0.9


def test_push_turns_one_expert_into_the_other_and_back(zoo_root: Path, spatial_engine, arith_engine) -> None:
    # (2) and (4).
    spatial_before = spatial_engine.evaluate(_tasks()).scores
    spatial_probe, _ = _probe(spatial_engine)
    again, cached = _probe(spatial_engine)
    assert _same(again, spatial_probe) and cached > 0  # the prefix cache is in play
    arith_probe, _ = _probe(arith_engine)
    assert not _same(spatial_probe, arith_probe)

    fingerprint = spatial_engine.weights_fingerprint()
    seconds = spatial_engine.push_weights(_state_dict(zoo_root / "arith"))
    assert 0 < seconds < 10
    assert spatial_engine.weights_fingerprint() != fingerprint
    # Nothing comes from blocks cached with the old weights (without the reset all would:
    # 128 tokens of each prompt, and the completions differ).
    pushed, cached = _probe(spatial_engine)
    assert cached == 0 and _same(pushed, arith_probe)
    assert spatial_engine.evaluate(_tasks()).scores == arith_engine.evaluate(_tasks()).scores

    spatial_engine.push_weights(_state_dict(zoo_root / "spatial"))
    assert spatial_engine.weights_fingerprint() == fingerprint
    back, cached = _probe(spatial_engine)
    assert cached == 0 and _same(back, spatial_probe)
    assert spatial_engine.evaluate(_tasks()).scores == spatial_before


def test_push_of_a_subset_and_of_other_dtypes(zoo_root: Path, spatial_engine, arith_engine) -> None:
    # A bf16 state dict is cast into the fp32 engine; tensors not pushed keep their values.
    import torch

    arith = _state_dict(zoo_root / "arith")
    spatial_engine.push_weights({k: v.to(torch.bfloat16) for k, v in arith.items()})
    bf16_probe, _ = _probe(spatial_engine)
    assert bf16_probe != _probe(arith_engine)[0]  # rounded weights: other logprobs
    before = spatial_engine.weights_fingerprint()
    spatial_engine.push_weights({"lm_head.weight": _state_dict(zoo_root / "spatial")["lm_head.weight"]})
    after = spatial_engine.weights_fingerprint()
    assert [k for k in before if before[k] != after[k]] == ["lm_head.weight"]
    assert not _same(_probe(spatial_engine)[0], bf16_probe)
    spatial_engine.push_weights(_state_dict(zoo_root / "spatial"))


def test_push_refuses_part_of_a_fused_layer(zoo_root: Path, spatial_engine) -> None:
    # vLLM fuses q/k/v into qkv_proj and rebuilds a layer from what it is given: q alone would
    # leave k and v uninitialised (NaN outputs).  Refused before anything is loaded.
    from evolve.evaluation import EvalError

    spatial = _state_dict(zoo_root / "spatial")
    before = spatial_engine.weights_fingerprint()
    q = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(EvalError, match=r"layer 'model.layers.0.self_attn.qkv_proj' must be pushed whole; "
                                        r"missing .*k_proj.weight, .*v_proj.weight"):
        spatial_engine.push_weights({q: spatial[q]})
    with pytest.raises(EvalError, match="'model.nope.weight' is not a tensor of"):
        spatial_engine.push_weights({"model.nope.weight": spatial[q]})
    assert spatial_engine.weights_fingerprint() == before
    whole = {k: v for k, v in spatial.items() if ".layers.0.self_attn." in k and "_proj" in k}
    spatial_engine.push_weights(whole)  # q, k, v and o: whole layers
    assert spatial_engine.weights_fingerprint() == before


# -- with vLLM: the worker ------------------------------------------------------------------


def _two_candidates(zoo_root: Path, seed: int, **genome_fields):
    """(config, a, b): the toy config on ``zoo_root`` (``genome_fields`` changed), limit 20, and
    two random candidates of its genome."""
    import numpy as np

    from evolve.config import parse_evolve_config
    from evolve.genome import Genome

    data = yaml.safe_load(TOY_CONFIG.read_text())
    data["genome"]["models"] = [str(zoo_root / Path(m).name) for m in data["genome"]["models"]]
    data["genome"]["base_model"] = str(zoo_root / "base")
    data["genome"].update(genome_fields)
    data["limit"] = 20
    config = parse_evolve_config(data)
    genome = Genome(config.genome, 4)
    lo, hi = (np.asarray(b) for b in genome.bounds)
    rng = np.random.default_rng(seed)
    a, b = (genome.decode(rng.uniform(lo, hi)) for _ in range(2))
    return config, a, b


def _worker_spec(config, template: dict, backend: str, **kw):
    from evolve.workers import WorkerSpec

    settings = _settings(limit=20, backend=backend, vllm={"max_num_seqs": 64})
    return WorkerSpec(template_recipe=template, settings=settings, train_tasks=list(config.tasks), threads=1, **kw)


def test_candidate_worker_merges_into_a_resident_dict_and_pushes(zoo_root: Path) -> None:
    import torch

    from evolve.protocols import TRAIN
    from evolve.workers import CandidateWorker

    config, a, b = _two_candidates(zoo_root, 0)
    hf = CandidateWorker(_worker_spec(config, a, "hf"))
    expected = {name: hf.run(name, recipe, TRAIN).scores for name, recipe in (("a", a), ("b", b))}
    hf.close()
    worker = CandidateWorker(_worker_spec(config, a, "vllm", fault_injection={"nan": ["nan"]}))
    try:
        assert all(t.dtype == torch.bfloat16 for t in worker.params.values())  # the recipe's dtype
        buffers = {name: t.data_ptr() for name, t in worker.params.items()}
        first = worker.run("a", a, TRAIN)
        assert first.status == "ok" and _close(first.scores, expected["a"]), (first, expected["a"])
        assert {"merge", "push", "eval", "run"} <= set(first.timings)
        # A non-finite merge is caught in the resident dict: never pushed, never scored.
        nan = worker.run("nan", b, TRAIN)
        assert nan.status == "failed" and nan.reason.startswith("non-finite weights in ")
        assert "push" not in nan.timings and "eval" not in nan.timings
        second = worker.run("b", b, TRAIN)
        assert second.status == "ok" and _close(second.scores, expected["b"]), (second, expected["b"])
        assert worker.run("a2", a, TRAIN).scores == first.scores
        assert {name: t.data_ptr() for name, t in worker.params.items()} == buffers  # merged in place
    finally:
        worker.close()


def _chat_variant(src: Path, dst: Path) -> Path:
    from tiny_models import with_added_tokens

    return with_added_tokens(src, dst, ["<|im_start|>", "<|im_end|>"], special=True)


def test_a_merged_vocabulary_is_pushed_into_an_engine_of_that_size(zoo_root: Path, tmp_path: Path) -> None:
    """genome.tokenizer_source: union over the zoo and a chat fine-tune with added tokens: the
    engine starts with the merged vocabulary and placeholder weights, every candidate is pushed
    whole and scores as the HF evaluator scores it."""
    from evolve.evaluation import EvalError
    from evolve.protocols import TRAIN
    from evolve.workers import CandidateWorker

    chat = _chat_variant(zoo_root / "format", tmp_path / "format_chat")
    config, a, b = _two_candidates(zoo_root, 1, models=[str(zoo_root / "spatial"), str(zoo_root / "arith"), str(chat)],
                                   tokenizer_source="union")
    hf = CandidateWorker(_worker_spec(config, a, "hf"))
    expected = {name: hf.run(name, recipe, TRAIN).scores for name, recipe in (("a", a), ("b", b))}
    hf.close()
    worker = CandidateWorker(_worker_spec(config, a, "vllm"))
    try:
        rows = json.loads((zoo_root / "base" / "config.json").read_text())["vocab_size"] + 2
        assert worker.scratch is not None and worker.params["model.embed_tokens.weight"].shape[0] == rows
        with pytest.raises(EvalError, match="placeholder weights"):  # nothing pushed yet
            worker.evaluator.evaluate(list(config.tasks))
        for name, recipe in (("a", a), ("b", b), ("a2", a)):
            result = worker.run(name, recipe, TRAIN)
            assert result.status == "ok", result.reason
            assert _close(result.scores, expected[name[0]]), (name, result.scores, expected[name[0]])
    finally:
        worker.close()


# -- with vLLM: a whole run -----------------------------------------------------------------


def _run(tmp_path: Path, zoo_root: Path, name: str, *extra: str, genome: dict | None = None) -> list[dict]:
    from evolve.cli import main as merge_evolve

    config = yaml.safe_load(TOY_CONFIG.read_text())
    config["limit"] = 20
    config["genome"].update(genome or {})
    work = tmp_path / name
    work.mkdir()
    (work / "zoo").symlink_to(zoo_root, target_is_directory=True)
    (work / "toy.yml").write_text(yaml.safe_dump(config))
    cwd = Path.cwd()
    os.chdir(work)  # the config names zoo/... relative to the working directory
    try:
        code = merge_evolve(["toy.yml", "--storage-path", "runs/toy", "--no-ray", "--max-fevals", "4",
                             "--force-population-size", "4", "--random-seed", "0", "-q",
                             "--no-save-final-model", *extra])
    finally:
        os.chdir(cwd)
    assert code == 0
    return [json.loads(line) for line in (work / "runs/toy/evaluations.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_whole_run_with_vllm_matches_hf(zoo_root: Path, tmp_path: Path, capsys) -> None:
    ledger = _run(tmp_path, zoo_root, "vllm", "--vllm")
    out = capsys.readouterr().out
    assert "best: train " in out
    train = [r for r in ledger if r["kind"] == "train"]
    assert len(train) == 4 and all(r["status"] == "ok" for r in train), train
    assert any(r["kind"] == "held_out" for r in ledger)
    assert all("push" in r["timings"] for r in train if r["cached_from"] is None)
    # The same run with the HF evaluator: same candidates, same fitness.
    reference = {r["eval_id"]: r for r in _run(tmp_path, zoo_root, "hf") if r["kind"] != "ask"}
    for record in ledger:
        if record["kind"] == "ask":
            continue
        other = reference[record["eval_id"]]
        assert record["recipe_hash"] == other["recipe_hash"]
        assert abs(record["fitness"] - other["fitness"]) <= 0.01, (record, other)


@pytest.mark.slow
def test_whole_run_with_vllm_and_a_merged_vocabulary(zoo_root: Path, tmp_path: Path) -> None:
    chat = _chat_variant(zoo_root / "format", tmp_path / "format_chat")
    genome = {"models": ["zoo/spatial", "zoo/arith", str(chat)], "tokenizer_source": "union"}
    ledger = _run(tmp_path, zoo_root, "vllm", "--vllm", genome=genome)
    scored = [r for r in ledger if r["kind"] in ("train", "baseline", "held_out")]
    assert {r["kind"] for r in scored} == {"train", "baseline", "held_out"}
    assert all(r["status"] == "ok" for r in scored), [r.get("reason") for r in scored]
    assert all("push" in r["timings"] for r in ledger if r["kind"] == "train" and r["cached_from"] is None)
