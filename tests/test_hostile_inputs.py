"""Probes of a hostile user: outputs aimed at a run's own files or at an input model, YAML alias
bombs and huge files, damaged ledgers handed to ``report``, one model under two spellings, a
busy storage path.  Each is one line and exit 2 (or a warning), in bounded time, nothing lost."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lm_eval")

from evolve.cli import main as merge_evolve  # noqa: E402
from evolve.lock import RunLock  # noqa: E402
from merge_core.cli import main as merge_yaml  # noqa: E402


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _config(models: dict[str, Path], **changes) -> dict:
    data = {"genome": {"models": [str(models["e1"]), str(models["e2"])], "merge_method": "task_arithmetic",
                       "base_model": str(models["base"]), "layer_granularity": 2},
            "tasks": [{"name": "toy_arith"}], "limit": 8, "apply_chat_template": False}
    data.update(changes)
    return data


def _argv(config: Path, store: Path, *extra: str) -> list[str]:
    return [str(config), "--storage-path", str(store), "--no-ray", "-q", "--max-fevals", "4",
            "--force-population-size", "4", "--no-save-final-model", "--no-baselines", *extra]


def _one_error_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


@pytest.fixture(scope="module")
def finished_run(task_models, tmp_path_factory) -> Path:
    """A small finished run (read-only: tests copy it before changing anything)."""
    root = tmp_path_factory.mktemp("finished")
    config = root / "c.yml"
    config.write_text(yaml.safe_dump(_config(task_models)))
    assert merge_evolve(_argv(config, root / "run")) == 0
    return root / "run"


# -- no command writes over a run's own files or an input model -------------------------------


@pytest.mark.parametrize("target", ["evaluations.jsonl", "run.json", "config.yml", "best_config.yaml", "sub",
                                    "sub/new.html", "new.html"])
def test_report_html_never_writes_over_the_run_directory(finished_run, tmp_path, capsys, target):
    store = tmp_path / "run"
    shutil.copytree(finished_run, store)
    (store / "sub").mkdir()
    before = _tree(store)
    assert merge_evolve(["report", "--storage-path", str(store), "--html", str(store / target)]) == 2
    _one_error_line(capsys, "--html", "inside the run directory")
    assert _tree(store) == before


def test_report_html_through_a_symlink_into_the_run_is_refused(finished_run, tmp_path, capsys):
    store = tmp_path / "run"
    shutil.copytree(finished_run, store)
    link = tmp_path / "innocent.html"
    link.symlink_to(store / "evaluations.jsonl")
    before = _tree(store)
    assert merge_evolve(["report", "--storage-path", str(store), "--html", str(link)]) == 2
    _one_error_line(capsys, "--html")
    assert _tree(store) == before


def test_report_html_writes_its_own_file_and_outside_the_run(finished_run, tmp_path, capsys):
    store = tmp_path / "run"
    shutil.copytree(finished_run, store)
    assert merge_evolve(["report", "--storage-path", str(store), "--html", str(store / "report.html")]) == 0
    assert merge_evolve(["report", "--storage-path", str(store), "--html", str(tmp_path / "elsewhere.html")]) == 0
    assert (tmp_path / "elsewhere.html").read_text().startswith("<!DOCTYPE html>")


def _recipe(tmp_path: Path, models: list[str], name: str = "r.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32",
                                    "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models]}))
    return path


@pytest.mark.parametrize("where", ["is", "inside", "contains", "symlink"])
def test_merge_yaml_never_writes_over_an_input_model(tiny_models, tmp_path, capsys, where):
    a, b = tmp_path / "models" / "a", tmp_path / "models" / "b"
    shutil.copytree(tiny_models["a"], a)
    shutil.copytree(tiny_models["c"], b)
    recipe = _recipe(tmp_path, [str(a), str(b)])
    out = {"is": b, "inside": b / "merged", "contains": tmp_path / "models", "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        out.symlink_to(b)
    before = _tree(tmp_path / "models")
    assert merge_yaml([str(recipe), str(out), "-q"]) == 2
    _one_error_line(capsys, "the input model", "writing there would destroy it")
    assert _tree(tmp_path / "models") == before
    assert not (b / "merged").exists()


def test_merge_yaml_never_replaces_the_folder_of_its_recipe(tiny_models, tmp_path, capsys):
    folder = tmp_path / "work"
    folder.mkdir()
    recipe = _recipe(folder, [str(tiny_models["a"]), str(tiny_models["c"])])
    assert merge_yaml([str(recipe), str(folder), "-q"]) == 2
    _one_error_line(capsys, "OUT_DIR", "contains the recipe")
    assert recipe.is_file()


def test_a_run_whose_final_model_would_replace_an_input_model_is_refused_before_it_starts(
        task_models, tmp_path, capsys):
    store = tmp_path / "run"
    model = store / "final_model"  # e.g. a previous run's export reused as an input, same storage path
    shutil.copytree(task_models["e2"], model)
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(_config({**task_models, "e2": model})))
    before = _tree(store)
    assert merge_evolve(_argv(config, store)) == 2
    _one_error_line(capsys, "--storage-path's final model folder", "the input model")
    assert _tree(store) == before


# -- YAML bombs and huge files -------------------------------------------------------------------


def _alias_bomb(levels: int, field: str) -> str:
    lines = ["j0: &j0 [lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels + 1):
        lines.append(f"j{i}: &j{i} [" + ", ".join([f"*j{i - 1}"] * 8) + "]")
    lines.append(f"{field}: *j{levels}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [9, 10])
def test_an_alias_bomb_config_is_refused_in_under_a_second(task_models, tmp_path, capsys, levels):
    config = tmp_path / "bomb.yml"
    good = yaml.safe_dump(_config(task_models)).replace("limit: 8\n", "")
    config.write_text(good + _alias_bomb(levels, "limit"))
    assert len(config.read_bytes()) < 1000
    start = time.monotonic()
    assert merge_evolve(_argv(config, tmp_path / "run")) == 2
    assert time.monotonic() - start < 1.0
    _one_error_line(capsys, "bomb.yml", "expands to more than")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("levels", [9, 10])
def test_an_alias_bomb_recipe_is_refused_in_under_a_second(tmp_path, capsys, levels):
    recipe = tmp_path / "bomb.yml"
    recipe.write_text("merge_method: linear\nmodels: [{model: a}, {model: b}]\n" + _alias_bomb(levels, "dtype"))
    start = time.monotonic()
    assert merge_yaml([str(recipe), str(tmp_path / "out"), "-q"]) == 2
    assert time.monotonic() - start < 1.0
    _one_error_line(capsys, "expands to more than")


def test_a_wrong_value_is_cut_before_it_is_rendered(tmp_path, capsys):
    """A large nested value in a field that takes a number: the message shows at most 60
    characters of it."""
    value = "lol"
    for _ in range(5):
        value = "[" + ", ".join([value] * 6) + "]"
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels: [{{model: a, parameters: {{weight: {value}}}}}, {{model: b}}]\n")
    start = time.monotonic()
    assert merge_yaml([str(recipe), str(tmp_path / "out"), "-q"]) == 2
    assert time.monotonic() - start < 1.0
    err = _one_error_line(capsys, "models[0].parameters.weight")
    assert len(err) < 300


def test_a_huge_config_is_refused_at_once(tmp_path, capsys):
    config = tmp_path / "huge.yml"
    with open(config, "w") as fh:
        fh.write("genome:\n  models: [a, b]\n  merge_method: linear\ntasks: [{name: toy_arith}]\n# ")
        fh.write("x" * (50 * 1024 * 1024))
    start = time.monotonic()
    assert merge_evolve(_argv(config, tmp_path / "run")) == 2
    assert time.monotonic() - start < 1.0
    _one_error_line(capsys, "huge.yml", "at most 4 MiB")


def test_anchors_of_ordinary_size_still_work(tiny_models, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\ndtype: float32\nmodels:\n"
                      f"  - {{model: {tiny_models['a']}, parameters: &w {{weight: 0.5}}}}\n"
                      f"  - {{model: {tiny_models['c']}, parameters: *w}}\n")
    assert merge_yaml([str(recipe), str(tmp_path / "out"), "-q"]) == 0


# -- report reads any ledger ---------------------------------------------------------------------


def test_report_reads_a_ledger_with_broken_and_repeated_records(finished_run, tmp_path, capsys):
    store = tmp_path / "run"
    shutil.copytree(finished_run, store)
    lines = (store / "evaluations.jsonl").read_text().splitlines()
    first_train = next(line for line in lines if json.loads(line)["kind"] == "train")
    damaged = lines + [json.dumps({"kind": "train", "eval_id": "x"}), first_train, json.dumps({"eval_id": "y"}),
                       json.dumps({**json.loads(first_train), "eval_id": "z", "fitness": "high"})]
    (store / "evaluations.jsonl").write_text("\n".join(damaged) + "\n")
    capsys.readouterr()
    assert merge_evolve(["report", "--storage-path", str(store), "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["evaluations"] == 4  # the repeated result counted once, the broken ones not at all
    warning = captured.err.strip()
    assert len(warning.splitlines()) == 1 and warning.startswith("merge-evolve report: warning: 4 ledger record(s)")
    n = len(lines)
    assert f"line {n + 1}: a train record without 'generation'" in warning
    assert f"line {n + 2}: result {json.loads(first_train)['eval_id']} appears twice" in warning
    assert "`resume` refuses this ledger" in warning
    assert merge_evolve(["report", "--storage-path", str(store), "--html", str(tmp_path / "r.html")]) == 0
    capsys.readouterr()
    # The repeated result alone: resume refuses it, in the words of the warning.
    (store / "evaluations.jsonl").write_text("\n".join(lines + [first_train]) + "\n")
    assert merge_evolve(["resume", "--storage-path", str(store), "--no-ray", "-q", "--max-fevals", "8"]) == 2
    assert f"result {json.loads(first_train)['eval_id']} appears twice" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["ask", "train", "held_out", "baseline"])
def test_report_survives_each_missing_field(finished_run, tmp_path, capsys, kind):
    from evolve.ledger_check import REQUIRED

    store = tmp_path / "run"
    shutil.copytree(finished_run, store)
    lines = (store / "evaluations.jsonl").read_text().splitlines()
    sample = next((json.loads(line) for line in lines if json.loads(line)["kind"] == kind),
                  {"kind": kind, "eval_id": f"{kind}/x", "name": "p", "task_set": "train", "of": "c000000",
                   "status": "ok", "fitness": 0.5, "scores": {}, "call": 0, "x": [0.0], "generation": 0})
    for field in ["kind", *REQUIRED[kind]]:
        broken = {k: v for k, v in sample.items() if k != field}
        (store / "evaluations.jsonl").write_text("\n".join([*lines, json.dumps(broken)]) + "\n")
        assert merge_evolve(["report", "--storage-path", str(store)]) == 0, field
        assert merge_evolve(["report", "--storage-path", str(store), "--html", str(tmp_path / "r.html")]) == 0
        assert "warning: 1 ledger record(s) not read" in capsys.readouterr().err


# -- one model under two spellings ---------------------------------------------------------------


def test_the_same_model_under_two_spellings_is_refused_by_merge_evolve(task_models, tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.chdir(task_models["e1"].parent)
    link = tmp_path / "e1-link"
    link.symlink_to(task_models["e1"])
    for spelling in ["./e1/", str(link)]:
        config = tmp_path / "c.yml"
        config.write_text(yaml.safe_dump(_config(task_models, genome={
            "models": ["e1", spelling], "merge_method": "task_arithmetic", "base_model": "base"})))
        assert merge_evolve(_argv(config, tmp_path / "run")) == 2
        _one_error_line(capsys, f"genome.models[1]: '{spelling}' is the same model as genome.models[0] 'e1'")
        assert not (tmp_path / "run").exists()


def test_the_same_model_under_two_spellings_is_refused_by_merge_yaml(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tiny_models["a"].parent)
    recipe = _recipe(tmp_path, ["a", "./a/"])
    assert merge_yaml([str(recipe), str(tmp_path / "out"), "-q"]) == 2
    _one_error_line(capsys, "models[1].model: './a/' is the same model as models[0].model 'a'")
    assert not (tmp_path / "out").exists()


def test_stacking_sources_under_two_spellings_are_refused(task_models, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(task_models["e1"].parent)
    config = tmp_path / "c.yml"
    data = {k: v for k, v in _config(task_models).items() if k != "genome"}
    config.write_text(yaml.safe_dump({**data, "stacking": {"sources": ["e1", "e2", "e1/."]}}))
    assert merge_evolve(_argv(config, tmp_path / "run")) == 2
    _one_error_line(capsys, "stacking.sources[2]: 'e1/.' is the same model as stacking.sources[0] 'e1'")


# -- the lock before the work --------------------------------------------------------------------


def test_a_busy_storage_path_is_refused_before_any_worker_starts(task_models, tmp_path, capsys, monkeypatch):
    from evolve import app

    started: list[int] = []
    monkeypatch.setattr(app, "_make_pool", lambda *a, **k: started.append(1))
    store = tmp_path / "run"
    store.mkdir()
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(_config(task_models)))
    with RunLock(store):
        before = _tree(store)
        assert merge_evolve(_argv(config, store)) == 2
        _one_error_line(capsys, "is in use by pid")
        assert _tree(store) == before
    assert not started


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_preflight_leaves_nothing_behind(task_models, tmp_path, capsys, existing):
    store = tmp_path / "new" / "deeper" / "run"
    if existing:
        store.mkdir(parents=True)
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(_config(task_models, tasks=[{"name": "toy_arith", "metric": "no_such_metric"}])))
    assert merge_evolve(_argv(config, store)) == 2
    capsys.readouterr()
    if existing:
        assert store.is_dir() and not list(store.iterdir())  # not even the lock file
    else:
        assert not (tmp_path / "new").exists()
    assert not os.path.lexists(tmp_path / "new" / "deeper" / "run" / ".lock")


# -- one vocabulary size, two numberings ---------------------------------------------------------


def _renumbered(src: Path, dst: Path) -> Path:
    """``src`` whose tokenizer swaps the ids of two words (same size, other numbering)."""
    shutil.copytree(src, dst)
    data = json.loads((dst / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["w0"], vocab["w1"] = vocab["w1"], vocab["w0"]
    (dst / "tokenizer.json").write_text(json.dumps(data))
    return dst


def test_models_that_number_their_tokens_differently_are_not_merged_by_id(tiny_models, tmp_path, capsys):
    other = _renumbered(tiny_models["c"], tmp_path / "renumbered")
    recipe = _recipe(tmp_path, [str(tiny_models["a"]), str(other)])
    assert merge_yaml([str(recipe), str(tmp_path / "out"), "-q"]) == 2
    _one_error_line(capsys, "numbers its tokens differently", "token id 4 is 'w0' in one and 'w1' in the other")
    assert not (tmp_path / "out").exists()
    same = _recipe(tmp_path, [str(tiny_models["a"]), str(tiny_models["c"])], name="same.yml")
    assert merge_yaml([str(same), str(tmp_path / "out"), "-q"]) == 0  # one tokenizer: merged as before


# -- a reader that stops reading (`... | head`) ------------------------------------------------


def _with_closed_stdout(argv: list[str]) -> tuple[int, str]:
    """Run a console script with a standard output whose reader is already gone; (code, stderr)."""
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to stdout fails with EPIPE, deterministically
    try:
        proc = subprocess.run([sys.executable, "-c", "import sys; from {} import main; sys.exit(main())".format(argv[0]),
                               *argv[1:]], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    finally:
        os.close(write_end)
    return proc.returncode, proc.stderr


def test_report_into_a_closed_pipe_ends_quietly_with_141(finished_run):
    code, err = _with_closed_stdout(["evolve.cli", "report", "--storage-path", str(finished_run)])
    assert code == 141 and err == "", err


def test_merge_yaml_into_a_closed_pipe_writes_the_model_and_exits_0(tiny_models, tmp_path):
    recipe = _recipe(tmp_path, [str(tiny_models["a"]), str(tiny_models["c"])])
    code, err = _with_closed_stdout(["merge_core.cli", str(recipe), str(tmp_path / "out")])
    assert code == 0 and "Traceback" not in err, err
    assert (tmp_path / "out" / "config.json").is_file()
