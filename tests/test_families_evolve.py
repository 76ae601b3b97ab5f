"""``merge-evolve`` on every family (tests/family_models.py): a short parameter-space search (preflight,
baselines, genome layer groups, candidates merged in place into the evaluated transformers model)
and a short layer-stacking search, each ending with a ``best_config.yaml`` that ``merge-yaml``
merges into a model transformers loads and runs.  Random tiny models score near chance: what is
tested is that every step runs for real on each family's layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from family_models import FAMILIES, build_family, load_and_run

from evolve.cli import main as merge_evolve
from merge_core.cli import main as merge_yaml

# (best_config.yaml, ours merged from it) of each family's parameter-space run: mergekit-yaml merges
# them all in one process at the end (test_best_configs_merge_with_mergekit).
BEST_CONFIGS: list[tuple[Path, Path]] = []
TASKS = {"tasks": [{"name": "toy_arith"}], "limit": 4, "apply_chat_template": False}


def _run(config: dict, tmp_path: Path, name: str, *flags: str) -> Path:
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump({**config, **TASKS}, sort_keys=False))
    store = tmp_path / f"run_{name}"
    argv = [str(path), "--storage-path", str(store), "--no-ray", "-q", "--random-seed", "0",
            "--no-save-final-model", *flags]
    assert merge_evolve(argv) == 0, name
    ledger = [json.loads(line) for line in (store / "evaluations.jsonl").read_text().splitlines()]
    train = [r for r in ledger if r["kind"] == "train"]
    assert train and all(r["status"] == "ok" for r in train), [r.get("reason") for r in train]
    assert merge_yaml([str(store / "best_config.yaml"), str(tmp_path / f"best_{name}"), "-q"]) == 0
    load_and_run(tmp_path / f"best_{name}")
    return store


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_merge_evolve_runs_on_the_family(family: str, tmp_path: Path) -> None:
    models = build_family(family, tmp_path / "models", variants=2, task_tokenizer=True)
    genome = {"models": [str(models["m1"]), str(models["m2"])], "base_model": str(models["base"]),
              "merge_method": "task_arithmetic", "layer_granularity": 2}
    store = _run({"genome": genome}, tmp_path, "ps", "--max-fevals", "3", "--force-population-size", "3")
    ledger = [json.loads(line) for line in (store / "evaluations.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "baseline" for r in ledger), sorted({r["kind"] for r in ledger})
    best = yaml.safe_load((store / "best_config.yaml").read_text())
    assert len(best["slices"]) == 2  # two layer groups of 2 layers
    BEST_CONFIGS.append((store / "best_config.yaml", tmp_path / "best_ps"))

    stacking = {"sources": [str(models["m1"]), str(models["m2"])], "slots": 5, "min_layers": 2}
    store = _run({"stacking": stacking}, tmp_path, "stack", "--max-fevals", "3", "--no-baselines")
    best = yaml.safe_load((store / "best_config.yaml").read_text())
    assert best["merge_method"] == "passthrough"


def test_vllm_refuses_a_moe_whose_experts_transformers_fuses(tmp_path: Path, monkeypatch, capsys) -> None:
    import evolve.flag_checks

    monkeypatch.setattr(evolve.flag_checks, "vllm_available", lambda: True)  # checked before anything else
    models = build_family("qwen3_moe", tmp_path / "models", variants=1, task_tokenizer=True)
    config = {"genome": {"models": [str(models["m1"])], "base_model": str(models["base"]),
                         "merge_method": "task_arithmetic"}, **TASKS}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    capsys.readouterr()  # the models' build progress
    assert merge_evolve([str(tmp_path / "c.yml"), "--storage-path", str(tmp_path / "run"), "--vllm", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("merge-evolve: error: --vllm: ") and "mixture of experts" in err and len(err.splitlines()) == 1
    assert "mlp.experts.gate_up_proj" in err and not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.mergekit
def test_best_configs_merge_with_mergekit(tmp_path: Path, mergekit_py: str) -> None:
    """Every family's exported best_config.yaml (from the runs above) is accepted by mergekit-yaml
    0.1.5, and gives merge-yaml's tensors (compared in float32)."""
    import subprocess

    from family_models import MERGEKIT_ORACLE
    from safetensors.torch import load_file

    if not BEST_CONFIGS:
        pytest.skip("no merge-evolve run of this session exported a best_config.yaml")
    (tmp_path / "recipes").mkdir()
    cases = []
    for i, (config, _) in enumerate(BEST_CONFIGS):
        # As exported (bfloat16, as mergekit-evolve's), and in float32 to compare the tensors:
        # mergekit rounds every bf16 operation (see the README's "Numerics").
        recipe = yaml.safe_load(config.read_text())
        (tmp_path / "recipes" / f"run{i}__best.yml").write_text(config.read_text())
        (tmp_path / "recipes" / f"run{i}__f32.yml").write_text(yaml.safe_dump({**recipe, "dtype": "float32"}))
        cases += [f"run{i}__best", f"run{i}__f32"]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run([mergekit_py, "-c", MERGEKIT_ORACLE, str(tmp_path)], capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads((tmp_path / "status.json").read_text())
    for i, (config, _) in enumerate(BEST_CONFIGS):
        assert status[f"run{i}__best"] == "ok" and status[f"run{i}__f32"] == "ok", (config, status[f"run{i}__best"])
        ours = tmp_path / f"ours{i}"
        assert merge_yaml([str(tmp_path / "recipes" / f"run{i}__f32.yml"), str(ours), "-q"]) == 0
        theirs = load_file(str(tmp_path / "mergekit" / f"run{i}__f32" / "model.safetensors"))
        got = {}
        for file in ours.glob("*.safetensors"):
            got.update(load_file(str(file)))
        assert sorted(got) == sorted(theirs), config
        for name, tensor in theirs.items():
            assert (got[name] - tensor).abs().max().item() <= 2e-3, (config, name)
