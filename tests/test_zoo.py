"""The toy model zoo and the toy lm-eval tasks: real models, real skills, offline on 2 CPU cores."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from zoo_fixture import REPO, ZOO_SEED

import zoo_isa  # noqa: E402
from toy_zoo import TaskArithmetic, ZooSettings, build_zoo, check_matrix, corpus, tasks  # noqa: E402  # noqa: E402
from toy_zoo import build as build_mod  # noqa: E402
from toy_zoo.evaluate import Scorer  # noqa: E402
from toy_zoo.matrix import EQUAL, heldout_tasks, search_tasks  # noqa: E402

EVAL_TASKS = REPO / "eval_tasks"
# A zoo small enough to build twice in seconds: same code path, no evaluation.
TINY = replace(ZooSettings(), vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2,
               base_steps=4, spatial_plan=(3, 4), arith_plan=(3, 4), format_plan=(3, 4),
               replay_batch=2, tokenizer_docs=200, evaluate=False, grid=())


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _task_manager(include: Path = EVAL_TASKS):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include), include_defaults=False)


# ---------------------------------------------------------------- task data (no models needed)

def test_task_data_regenerates_byte_identically(tmp_path: Path) -> None:
    written = tasks.write_task_data(tmp_path)
    assert len(written) == 6
    for path in written:
        shipped = tasks.DATA_DIR / path.name
        assert shipped.read_bytes() == path.read_bytes(), f"{shipped} differs from its regeneration"
    assert sum(p.stat().st_size for p in written) < 1_000_000


def test_splits_are_disjoint_from_each_other_and_from_training() -> None:
    fresh = corpus.FreshDocs()
    for skill, mod in tasks.SKILLS.items():
        search = [mod.doc_key(d) for d in tasks.read_docs(skill, "search")]
        held = [mod.doc_key(d) for d in tasks.read_docs(skill, "heldout")]
        assert len(set(search)) == len(search) == tasks.DOCS_PER_SPLIT
        assert len(set(held)) == len(held) == tasks.DOCS_PER_SPLIT
        assert not set(search) & set(held)
        contexts = {mod.render_context(d) for s in tasks.SPLITS for d in tasks.read_docs(skill, s)}
        train = corpus.skill_pairs(skill, 3000, ZOO_SEED, fresh)
        # the format expert's context is the prompt only: compare whole rendered docs instead
        seen = {c + t.removesuffix(" </s>") for c, t in train} if skill == "format" else {c for c, _ in train}
        assert not seen & contexts, f"{skill}: training data contains scored docs"


def test_task_yamls_render_exactly_what_the_experts_train_on() -> None:
    from lm_eval.tasks import get_task_dict

    names = search_tasks() + heldout_tasks()
    loaded = get_task_dict(names, _task_manager())
    for skill, mod in tasks.SKILLS.items():
        for split in tasks.SPLITS:
            task = loaded[tasks.task_name(skill, split)]
            docs = list(task.test_docs())
            assert len(docs) == tasks.DOCS_PER_SPLIT
            for doc in docs[:50]:
                assert task.doc_to_text(doc) == mod.render_context(doc)
                choice = task.doc_to_choice(doc)[task.doc_to_target(doc)]
                assert task.config.target_delimiter + choice == mod.render_answer(doc)


def test_group_tasks_list_the_three_skills() -> None:
    manager = _task_manager()
    for group in ("toy_all", "toy_all_heldout"):
        assert group in manager.all_groups
    assert {"toy_spatial", "toy_arith_heldout", "toy_prompt_format", "spartqa_train",
            "alpaca_prompt_format"} <= set(manager.all_tasks)


def test_user_tasks_read_prepared_hub_data_and_fail_clearly_without(tmp_path: Path) -> None:
    from lm_eval.tasks import get_task_dict

    copy = tmp_path / "eval_tasks"
    copy.mkdir()
    for path in list(EVAL_TASKS.glob("*.yaml")) + list(EVAL_TASKS.glob("*.py")):
        shutil.copy(path, copy / path.name)
    with pytest.raises(FileNotFoundError, match=r"hub/spartqa_train\.jsonl.*prepare_hub_tasks\.py"):
        get_task_dict(["spartqa_train"], _task_manager(copy))
    hub = copy / "data" / "hub"
    hub.mkdir(parents=True)
    spart = {"story": "A box is left of a cup.", "question": "Where is the box?",
             "candidate_answers": ["left", "right", "above", "below"], "answer": 2}
    alpaca = {"instruction": "Say hi.", "input": "", "output": "Hi!", "text": "x"}
    (hub / "spartqa_train.jsonl").write_text(json.dumps(spart) + "\n")
    (hub / "alpaca_gpt4_500.jsonl").write_text(json.dumps(alpaca) + "\n")
    loaded = get_task_dict(["spartqa_train", "alpaca_prompt_format"], _task_manager(copy))
    sp, al = loaded["spartqa_train"], loaded["alpaca_prompt_format"]
    doc = next(iter(sp.test_docs()))
    assert sp.doc_to_text(doc) == ("Context:\nA box is left of a cup.\n\nQuestion: Where is the box?\n"
                                   "A. left\nB. right\nC. above\nD. below\nAnswer:")
    assert sp.doc_to_target(doc) == 2
    doc = next(iter(al.test_docs()))
    assert al.doc_to_text(doc) == "### Instruction:\nSay hi.\n### Response:\nHi!"
    assert al.doc_to_choice(doc)[al.doc_to_target(doc)] == "</s>"


def test_prepare_hub_tasks_fails_with_one_line_offline(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_hub_tasks.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "offline" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_zoo_merges_go_through_merge_core(tiny_models: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    def sd(name: str) -> dict[str, torch.Tensor]:
        files = sorted(tiny_models[name].glob("*.safetensors"))
        return {k: v.float() for f in files for k, v in load_file(f).items()}

    base, a, b = sd("base"), sd("a"), sd("b")
    merge = TaskArithmetic(tiny_models["base"], [tiny_models["a"], tiny_models["b"]])
    zero, only_a, mixed = merge([0, 0]), merge([1, 0]), merge([0.5, 2.0])
    assert set(zero) == set(base)
    for name in base:
        assert torch.allclose(zero[name], base[name])
        assert torch.allclose(only_a[name], a[name], atol=1e-6)
        want = base[name] + 0.5 * (a[name] - base[name]) + 2 * (b[name] - base[name])
        assert torch.allclose(mixed[name], want, atol=1e-5), name
    assert torch.equal(sd("base")["model.norm.weight"], base["model.norm.weight"])  # inputs untouched
    with pytest.raises(ValueError):
        merge([1.0])


# ---------------------------------------------------------------- build mechanics (tiny settings)

def test_same_seed_gives_byte_identical_files_other_seed_differs(tmp_path: Path) -> None:
    a = build_zoo(tmp_path / "a", seed=5, settings=TINY, log=lambda _m: None)
    b = build_zoo(tmp_path / "b", seed=5, settings=TINY, log=lambda _m: None)
    c = build_zoo(tmp_path / "c", seed=6, settings=TINY, log=lambda _m: None)
    da, db, dc = _digests(a.root), _digests(b.root), _digests(c.root)
    assert {k for k in da if k.endswith("model.safetensors")} == {f"{m}/model.safetensors" for m in build_mod.MODELS}
    assert da == db
    assert all(da[f"{m}/model.safetensors"] != dc[f"{m}/model.safetensors"] for m in build_mod.MODELS)
    assert torch.get_num_threads() >= 1 and not torch.are_deterministic_algorithms_enabled()


def test_cache_force_and_interrupted_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "zoo"
    first = build_zoo(out, seed=1, settings=TINY, log=lambda _m: None)
    stamp_mtime = (out / build_mod.STAMP).stat().st_mtime_ns
    again = build_zoo(out, seed=1, settings=TINY, log=lambda _m: None)
    assert not first.cached and again.cached and again.seconds < 2.0
    assert (out / build_mod.STAMP).stat().st_mtime_ns == stamp_mtime
    other = build_zoo(out, seed=1, settings=replace(TINY, base_steps=5), log=lambda _m: None)
    assert not other.cached  # settings are part of the key
    forced = build_zoo(out, seed=1, settings=replace(TINY, base_steps=5), force=True, log=lambda _m: None)
    assert not forced.cached

    def boom(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "_save_model", boom)
    with pytest.raises(KeyboardInterrupt):
        build_zoo(tmp_path / "new", seed=1, settings=TINY, log=lambda _m: None)
    assert not (tmp_path / "new").exists()
    assert not list(tmp_path.glob(".new.building-*"))
    with pytest.raises(KeyboardInterrupt):  # a failed rebuild leaves the old zoo intact
        build_zoo(out, seed=2, settings=TINY, log=lambda _m: None)
    assert build_mod.read_stamp(out)["seed"] == 1


# ---------------------------------------------------------------- the real zoo (session fixture)

def test_zoo_models_are_ordinary_hf_directories(toy_zoo) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name, path in toy_zoo.models.items():
        for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json"):
            assert (path / f).is_file(), f"{name}: {f} missing"
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.model_type == "llama" and model.dtype == torch.float32
        assert tok.eos_token == "</s>" and tok.bos_token == "<s>" and tok.pad_token == "<pad>"
        assert tok("3+4=")["input_ids"][0] == tok.bos_token_id
        assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 1.5e6


def test_matrix_meets_the_bar(toy_zoo) -> None:
    m = toy_zoo.matrix
    assert m is not None and check_matrix(m) == [] and m["failures"] == []
    rows = m["rows"]
    for expert, own in zip(m["experts"], search_tasks()):
        assert rows[expert][own] >= rows["base"][own] + 0.25
    best = m["objective"]["merge_grid_best"]["search"]
    rivals = [m["objective"][k]["search"] for k in [*m["experts"], EQUAL]]
    assert best >= max(rivals) + 0.10
    # the held-out split agrees that the found merge combines the skills
    assert m["objective"]["merge_grid_best"]["heldout"] > max(m["objective"][k]["heldout"] for k in m["experts"])


def test_saved_models_score_as_in_the_matrix(toy_zoo) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = toy_zoo.models["format"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    scorer = Scorer(model, AutoTokenizer.from_pretrained(path), search_tasks(), EVAL_TASKS)
    scores = scorer.score()
    for task, value in scores.items():
        assert value == pytest.approx(toy_zoo.matrix["rows"]["format"][task], abs=1e-9)


def test_second_build_call_is_cached(toy_zoo) -> None:
    t0 = time.perf_counter()
    again = build_zoo(toy_zoo.root, seed=ZOO_SEED, settings=ZooSettings(), log=lambda _m: None)
    assert again.cached and time.perf_counter() - t0 < 2.0
    assert again.matrix == toy_zoo.matrix


@pytest.mark.slow
def test_lm_eval_cli_runs_a_toy_task_offline_from_any_cwd(toy_zoo, tmp_path: Path) -> None:
    # lm-eval 0.4.13's CLI always passes its --device (default cuda:0) to the model, so
    # `--model_args ...,device=cpu` fails there with "multiple values for 'device'": use --device.
    lm_eval = Path(sys.executable).with_name("lm_eval")
    cmd = [str(lm_eval) if lm_eval.exists() else "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={toy_zoo.models['spatial']}", "--device", "cpu", "--tasks", "toy_spatial",
           "--include_path", str(EVAL_TASKS)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r"\|toy_spatial\s*\|.*?\|acc\s*\|[^|]*\|\s*([0-9.]+)\s*\|", proc.stdout)
    assert found, proc.stdout[-2000:]
    assert float(found.group(1)) == pytest.approx(toy_zoo.matrix["rows"]["spatial"]["toy_spatial"], abs=1e-3)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 only")
def test_zoo_build_pins_torch_to_avx2_kernels():
    """build_zoo.py pins torch's vector kernels before torch loads, so AVX-512 machines train the
    same zoo as AVX2 ones (their kernels round differently; the toy search's result moved)."""
    code = ("import sys; sys.path.insert(0, 'scripts'); import zoo_isa; zoo_isa.pin_vector_isa(); "
            "assert 'torch' not in sys.modules; import torch; print(torch.backends.cpu.get_cpu_capability())")
    env = {k: v for k, v in os.environ.items() if k not in zoo_isa.PINNED}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "AVX2"
