"""Fail fast, write nothing: a corpus of malformed configs, flags, model folders and run directories.

Every case runs ``merge-evolve`` (in process, ``--no-ray``) on a tiny model zoo that reads the
toy tasks and asserts what a user must see: exit code 2, at most 3 lines on stderr (argparse's
usage lines aside) that name the field, flag or file, no traceback, and a storage path exactly
as it was (absent stays absent; an existing run directory byte for byte).  A valid config still
runs, and resumes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

pytest.importorskip("lm_eval")

from evolve.cli import main as merge_evolve  # noqa: E402

Setup = Callable[["Ctx"], None]


@dataclass
class Ctx:
    """One case's world: model folders, the config (as data or raw text), extra flags."""

    root: Path
    models: dict[str, Path]
    config: dict = field(default_factory=dict)
    raw: str | bytes | None = None  # written instead of `config` when set
    flags: list[str] = field(default_factory=list)
    storage: Path | None = None
    verb: str = "run"

    def model(self, name: str, source: str = "e1") -> Path:
        """A private copy of a model folder, to damage."""
        dst = self.root / "models" / name
        if not dst.exists():
            shutil.copytree(self.models[source], dst)
        return dst

    def edit_json(self, path: Path, **changes) -> None:
        data = json.loads(path.read_text())
        for key, value in changes.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        path.write_text(json.dumps(data))


def base_config(models: dict[str, Path]) -> dict:
    return {
        "genome": {"models": [str(models["e1"]), str(models["e2"])], "merge_method": "task_arithmetic",
                   "base_model": str(models["base"]), "layer_granularity": 2},
        "tasks": [{"name": "toy_arith"}],
        "held_out": [{"name": "toy_arith_heldout"}],
        "limit": 16,
        "apply_chat_template": False,
    }


def genome(**changes) -> Setup:
    return lambda c: c.config["genome"].update(changes)


def top(**changes) -> Setup:
    def apply(c: Ctx) -> None:
        for key, value in changes.items():
            if value is None:
                c.config.pop(key, None)
            else:
                c.config[key] = value
    return apply


def flags(*args: str) -> Setup:
    return lambda c: c.flags.extend(args)


def raw(text: str | bytes) -> Setup:
    def apply(c: Ctx) -> None:
        c.raw = text
    return apply


def model_as(role: str, build: Callable[[Ctx], Path]) -> Setup:
    """Put the folder ``build`` makes in the genome: role 'base' or 'models[i]'."""
    def apply(c: Ctx) -> None:
        path = str(build(c))
        if role == "base":
            c.config["genome"]["base_model"] = path
        else:
            c.config["genome"]["models"][int(role[7:-1])] = path
    return apply


def damaged(name: str, damage: Callable[[Ctx, Path], None], source: str = "e1") -> Callable[[Ctx], Path]:
    def build(c: Ctx) -> Path:
        path = c.model(name, source)
        damage(c, path)
        return path
    return build


def _truncate(path: Path, size: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:size])


def _other_width(c: Ctx) -> Path:
    from conftest import TASK_VOCAB

    from tiny_models import make_tiny_llama

    return make_tiny_llama(c.root / "models" / "wide", seed=5, tokenizer=True, hidden_size=64,
                           vocab_size=TASK_VOCAB)


def _deeper(c: Ctx) -> Path:
    from tiny_models import make_tiny_llama

    return make_tiny_llama(c.root / "models" / "deep", seed=6, tokenizer=True, num_hidden_layers=6)


def _no_tokenizer(c: Ctx, path: Path) -> None:
    for f in path.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
            f.unlink()


def _weights(path: Path) -> Path:
    return next(p for p in path.iterdir() if p.suffix == ".safetensors")


def _pickle_only(c: Ctx, path: Path) -> None:
    w = _weights(path)
    w.rename(path / "pytorch_model.bin")


def _storage(kind: str) -> Setup:
    def apply(c: Ctx) -> None:
        if kind == "file":
            (c.root / "store").write_text("not a directory")
            c.storage = c.root / "store"
        elif kind == "under_file":
            (c.root / "blocker").write_text("x")
            c.storage = c.root / "blocker" / "run"
    return apply


# -- run directories (made by a real run once per module, then damaged) ---------------------


@pytest.fixture(scope="module")
def finished_run(task_models, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("finished")
    config = base_config(task_models)
    (root / "config.yml").write_text(yaml.safe_dump(config))
    store = root / "run"
    code = merge_evolve([str(root / "config.yml"), "--storage-path", str(store), "--no-ray", "-q",
                         "--max-fevals", "4", "--force-population-size", "4", "--no-save-final-model"])
    assert code == 0
    return store, config


def run_dir(damage: Callable[[Path], None] | None, verb: str = "resume") -> Setup:
    def apply(c: Ctx) -> None:
        store, config = c.finished  # type: ignore[attr-defined]
        c.storage = c.root / "stored"
        shutil.copytree(store, c.storage)
        c.config = json.loads(json.dumps(config))
        c.verb = verb
        if damage is not None:
            damage(c.storage)
    return apply


def _foreign_ask(store: Path) -> None:
    """The first ask record's point moved: the ledger no longer replays on these settings."""
    lines = (store / "evaluations.jsonl").read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if json.loads(line)["kind"] == "ask")  # after the baselines
    first = json.loads(lines[at])
    first["x"][0] += 0.3
    lines[at] = json.dumps(first) + "\n"
    (store / "evaluations.jsonl").write_text("".join(lines))


def _ledger_garbage(store: Path) -> None:
    lines = (store / "evaluations.jsonl").read_text().splitlines(keepends=True)
    lines[1] = "{not json\n"
    (store / "evaluations.jsonl").write_text("".join(lines))


CASES: list[tuple[str, Setup, str]] = [
    # -- flags --
    ("popsize-1", flags("--force-population-size", "1"), "--force-population-size"),
    ("sigma0-negative", flags("--sigma0", "-1"), "--sigma0"),
    ("sigma0-nan", flags("--sigma0", "nan"), "--sigma0"),
    ("sigma0-zero", flags("--sigma0", "0"), "--sigma0"),
    ("seed-negative", flags("--random-seed", "-1"), "--random-seed"),
    ("seed-float", flags("--random-seed", "1.5"), "--random-seed"),
    ("max-fevals-0", flags("--max-fevals", "0"), "--max-fevals"),
    ("max-fevals-word", flags("--max-fevals", "many"), "--max-fevals"),
    ("workers-0", flags("--num-workers", "0"), "--num-workers"),
    ("timeout-negative", flags("--timeout", "-5"), "--timeout"),
    ("eval-timeout-0", flags("--eval-timeout", "0"), "--eval-timeout"),
    ("batch-size-0", flags("--batch-size", "0"), "--batch-size"),
    ("num-gpus-0", flags("--num-gpus", "0"), "--num-gpus"),
    ("unknown-flag", flags("--frobnicate", "4"), "--frobnicate"),
    ("abbreviated-flag", flags("--max-feval", "500"), "--max-feval"),
    ("missing-search-path", flags("--task-search-path", "/no/such/tasks"), "--task-search-path"),
    ("8bit", flags("--load-in-8bit"), "--load-in-8bit"),
    ("device-bogus", flags("--device", "bogus"), "--device"),
    ("device-cuda-absent", flags("--device", "cuda"), "--device"),
    ("device-cuda-index", flags("--device", "cuda:x"), "--device"),
    ("eval-dtype-bogus", flags("--eval-dtype", "fp7"), "--eval-dtype"),
    ("storage-is-file", _storage("file"), "--storage-path"),
    ("storage-under-file", _storage("under_file"), "--storage-path"),
    ("resume-nothing", lambda c: setattr(c, "verb", "resume"), "no run to resume"),
    # -- config files --
    ("config-missing", raw(None), "cannot read evolve config"),  # raw(None) + no file: see _write
    ("config-binary", raw(bytes(range(256)) * 4), "not a UTF-8 text file"),
    ("config-list", raw("- a\n- b\n"), "must be a YAML mapping"),
    ("config-empty", raw(""), "must be a YAML mapping"),
    ("config-syntax", raw("genome: [a\ntasks: b\n"), "invalid YAML at line"),
    ("dup-top-key", raw("tasks: [a]\ntasks: [b]\ngenome: {models: [a], merge_method: linear}\n"),
     "duplicate key 'tasks'"),
    ("dup-nested-key", raw("genome:\n  models: [a]\n  models: [b]\n  merge_method: linear\ntasks: [t]\n"),
     "duplicate key 'models'"),
    ("unknown-top-key", top(tasks_weights=[1]), "unknown key(s) 'tasks_weights'"),
    ("unknown-genome-key", genome(layers=4), "genome: unknown key(s) 'layers'"),
    ("no-tasks", top(tasks=None), "tasks"),
    ("tasks-empty", top(tasks=[]), "tasks"),
    ("weights-zero", top(tasks=[{"name": "toy_arith", "weight": 0}]), "all task weights are 0"),
    ("method-unknown", genome(merge_method="frankenstein"), "genome.merge_method"),
    ("no-base", genome(base_model=None), "genome.base_model"),
    ("models-duplicate", lambda c: c.config["genome"]["models"].append(c.config["genome"]["models"][0]),
     "genome.models[2]"),
    ("model-empty-ref", lambda c: c.config["genome"]["models"].append(" "), "genome.models[2]"),
    ("granularity-negative", genome(layer_granularity=-1), "genome.layer_granularity"),
    ("limit-0", top(limit=0), "limit"),
    ("fewshot-negative", top(num_fewshot=-1), "num_fewshot"),
    ("weight-nan", top(tasks=[{"name": "toy_arith", "weight": float("nan")}]), "tasks[0].weight"),
    ("task-name-empty", top(tasks=[{"name": " "}]), "tasks[0].name"),
    ("gpu-util", top(vllm={"gpu_memory_utilization": 1.5}), "vllm.gpu_memory_utilization"),
    ("vllm-batch-0", top(vllm={"batch_size": 0}), "vllm.batch_size"),
    ("vllm-dtype", top(vllm={"dtype": "fp7"}), "vllm.dtype"),
    ("vllm-tp-0", top(vllm={"tensor_parallel_size": 0}), "vllm.tensor_parallel_size"),
    ("slerp-one-model", lambda c: c.config["genome"].update(merge_method="slerp", base_model=None,
                                                            models=c.config["genome"]["models"][:1]),
     "slerp needs at least two models"),
    ("filter-empty", genome(filters=[""]), "genome.filters[0]"),
    ("filter-duplicate", genome(filters=["mlp", "mlp"]), "genome.filters[1]"),
    ("held-out-repeat", top(held_out=["toy_arith_heldout", "toy_arith_heldout"]), "held_out[1]"),
    # -- model folders --
    ("model-missing", genome(models=["/no/such/model", "x"]), "genome.models[0]"),
    ("base-missing", genome(base_model="/no/such/base"), "genome.base_model"),
    ("no-config-json", model_as("models[0]", damaged("nocfg", lambda c, p: (p / "config.json").unlink())),
     "genome.models[0]"),
    ("config-json-invalid", model_as("models[1]", damaged("badjson", lambda c, p: (p / "config.json")
                                                          .write_text("{oops"))), "genome.models[1]"),
    ("no-num-layers", model_as("base", damaged("nolayers", lambda c, p: c.edit_json(
        p / "config.json", num_hidden_layers=None), "base")), "num_hidden_layers"),
    ("num-layers-string", model_as("base", damaged("strlayers", lambda c, p: c.edit_json(
        p / "config.json", num_hidden_layers="four"), "base")), "num_hidden_layers"),
    ("arch-ambiguous", model_as("models[0]", damaged("arch", lambda c, p: c.edit_json(
        p / "config.json", architectures=["LlamaForCausalLM", "TransformerXLForWeird"]))),
     "must name exactly one architecture"),
    ("no-weights", model_as("models[0]", damaged("noweights", lambda c, p: _weights(p).unlink())),
     "genome.models[0]"),
    ("pickle-only", model_as("models[0]", damaged("pickle", _pickle_only)), "genome.models[0]"),
    ("corrupt-safetensors", model_as("models[1]", damaged("corrupt", lambda c, p: _truncate(_weights(p), 5))),
     "genome.models[1]"),
    ("depth-mismatch", model_as("models[1]", _deeper), "genome.models[1]"),
    ("shape-mismatch", model_as("models[0]", _other_width), "genome"),
    ("base-no-tokenizer", model_as("base", damaged("notok", _no_tokenizer, "base")), "no tokenizer"),
    ("filter-matches-nothing", genome(filters=["q_projection"]), "genome.filters[0]"),
    # -- tasks and metrics (caught by the preflight evaluation) --
    ("task-unknown", top(tasks=[{"name": "no_such_task_xyz"}]), "tasks[0].name: unknown lm-eval task"),
    ("metric-unreported", top(tasks=[{"name": "toy_arith", "metric": "bleu,none"}]), "bleu,none"),
    ("held-out-metric", top(held_out=[{"name": "toy_arith_heldout", "metric": "f1,none"}]), "held-out"),
    ("held-out-unknown", top(held_out=["no_such_heldout_xyz"]), "held_out[0].name: unknown lm-eval task"),
    ("chat-template-missing", top(apply_chat_template=True), "chat template"),
    ("split-unknown", top(tasks=[{"name": "toy_arith", "split": "nope"}]), "no split 'nope'"),
    # -- run directories --
    ("resume-no-config-dir", run_dir(lambda s: (s / "config_dir.txt").unlink()), "config_dir.txt is missing"),
    ("resume-config-dir-gone", run_dir(lambda s: (s / "config_dir.txt").write_text("/no/such/folder")),
     "config_dir.txt names no existing folder"),
    ("resume-config-broken", run_dir(lambda s: (s / "config.yml").write_text("genome: [\n")), "config.yml"),
    ("resume-manifest-truncated", run_dir(lambda s: _truncate(s / "run.json", 20)), "run manifest is damaged"),
    ("resume-foreign-ledger", run_dir(_foreign_ask), "cannot resume: ask call 0 re-asked on replay differs"),
    ("resume-ledger-garbage", run_dir(_ledger_garbage), "line 2 of"),
    ("rerun-other-config", run_dir(None, verb="run"), "differs from the stored run"),
    ("rerun-other-seed", lambda c: (run_dir(None, verb="run")(c), c.flags.extend(["--random-seed", "5"])),
     "seed differs"),
]


def _tree(path: Path) -> dict[str, str] | None:
    if not path.exists():
        return None
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("name,setup,expected", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_exits_2_in_one_line_and_writes_nothing(name, setup, expected, task_models, tmp_path,
                                                                 request, capsys):
    c = Ctx(root=tmp_path, models=task_models, config=base_config(task_models))
    if name.startswith(("resume-", "rerun-")):
        c.finished = request.getfixturevalue("finished_run")  # type: ignore[attr-defined]
    setup(c)
    if name == "rerun-other-config":
        c.config["limit"] = 3
    config_path = tmp_path / "config.yml"
    if name != "config-missing":
        if c.raw is not None:
            (config_path.write_bytes if isinstance(c.raw, bytes) else config_path.write_text)(c.raw)
        else:
            config_path.write_text(yaml.safe_dump(c.config))
    storage = c.storage or tmp_path / "run"
    before = _tree(storage)
    argv = ([str(config_path)] if c.verb == "run" else ["resume"]) + ["--storage-path", str(storage), "--no-ray",
                                                                     "-q", "--max-fevals", "4", *c.flags]
    try:
        code = merge_evolve(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) <= 3, err
    assert expected in err, err
    assert _tree(storage) == before, "the storage path was changed"


def test_a_valid_config_still_runs_and_resumes(task_models, tmp_path, capsys):
    config_path = tmp_path / "config.yml"
    config_path.write_text(yaml.safe_dump(base_config(task_models)))
    store = tmp_path / "run"
    argv = [str(config_path), "--storage-path", str(store), "--no-ray", "--max-fevals", "4",
            "--force-population-size", "4", "--no-save-final-model"]
    assert merge_evolve(argv) == 0
    err = capsys.readouterr().err
    assert "preflight: '" in err and "train toy_arith=" in err and "held_out toy_arith_heldout=" in err
    assert {p.name for p in store.iterdir()} >= {"config.yml", "config_dir.txt", "run.json", "evaluations.jsonl"}
    assert merge_evolve(argv[:-1] + ["--max-fevals", "8", "--no-save-final-model"]) == 0
    ledger = [json.loads(line) for line in (store / "evaluations.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "train" for r in ledger) == 8


def test_a_run_without_any_successful_evaluation_exits_1(task_models, tmp_path, monkeypatch, capsys):
    """Every candidate fails for a passing reason (so the run is not stopped as systematic): the
    budget is spent and the exit code says that nothing was found."""
    from evolve.protocols import Result
    from evolve.workers import worker

    real_run = worker.CandidateWorker.run

    def out_of_memory(self, eval_id, recipe, task_set, race=None):
        if eval_id.startswith("preflight/"):
            return real_run(self, eval_id, recipe, task_set, race)
        return Result(eval_id, status="failed", reason="OutOfMemoryError: CUDA out of memory (fake)")

    monkeypatch.setattr(worker.CandidateWorker, "run", out_of_memory)
    config_path = tmp_path / "config.yml"
    config_path.write_text(yaml.safe_dump(base_config(task_models)))
    argv = [str(config_path), "--storage-path", str(tmp_path / "run"), "--no-ray", "-q", "--max-fevals", "4",
            "--force-population-size", "4"]
    assert merge_evolve(argv) == 1
    assert "no successful evaluation" in capsys.readouterr().out
