"""Layer stacking (the data-flow space): the genome, the in-memory stack, the whole run.

The stack a worker evaluates must be the model ``merge-yaml`` writes from the exported
passthrough recipe (same logits), built without copying a weight; ``configs/toy_stacking.yml``
runs end to end (search, export, merge-yaml round trip, transformers load, mergekit-yaml's
tensors); bad sources are one-line errors naming the field; a recipe source (an earlier
parameter-space run's result) is merged once and stacked.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("lm_eval")

from evolve.cli import main as merge_evolve  # noqa: E402
from evolve.stacking_genome import StackingGenome  # noqa: E402
from merge_core.cli import main as merge_yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# -- the genome ----------------------------------------------------------------------------------


def test_the_start_point_is_the_first_source_itself():
    genome = StackingGenome(["a", "b", "c"], 4)
    assert genome.dimension == 4 * 5 and genome.bounds == ([0.0] * 20, [1.0] * 20)
    recipe = genome.decode(genome.initial_point(False, np.random.default_rng(0)))
    assert recipe == {"merge_method": "passthrough", "dtype": "bfloat16",
                      "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]}]}]}


def _x(genome, slots):
    """A vector from (use, layer fraction, source index) per slot."""
    x = np.zeros(genome.shape)
    for i, (use, layer, source) in enumerate(slots):
        x[i, 0], x[i, 1], x[i, 2 + source] = use, layer, 1.0
    return x.reshape(-1)


def test_runs_of_consecutive_layers_become_one_slice_and_skips_drop_out():
    genome = StackingGenome(["a", "b"], 4, slots=5)
    x = _x(genome, [(1, 0.0, 1), (1, 1 / 3, 1), (0, 0.0, 0), (1, 1.0, 0), (1, 0.0, 0)])
    assert genome.layers(x) == [(1, 0), (1, 1), (0, 3), (0, 0)]
    assert genome.decode(x)["slices"] == [{"sources": [{"model": "b", "layer_range": [0, 2]}]},
                                          {"sources": [{"model": "a", "layer_range": [3, 4]}]},
                                          {"sources": [{"model": "a", "layer_range": [0, 1]}]}]


def test_the_depth_stays_within_its_bounds():
    genome = StackingGenome(["a"], 4, slots=6, min_layers=3, max_layers=4)
    nothing = _x(genome, [(0.1 * i, 0.5, 0) for i in range(6)])
    assert len(genome.layers(nothing)) == 3  # the three slots that wanted most
    everything = _x(genome, [(0.5 + 0.05 * i, 0.5, 0) for i in range(6)])
    assert [i for i in range(6)] and len(genome.layers(everything)) == 4


# -- the stack in memory --------------------------------------------------------------------------


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_the_stack_is_merge_yamls_model_and_copies_no_weight(zoo_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from evolve.workers.stacking import StackedModel, StackingSource, StackingSpec, layer_plan

    refs = [str(zoo_dir / n) for n in ("spatial", "arith", "format")]
    genome = StackingGenome(refs, 4, slots=6)
    x = _x(genome, [(1, 0.0, 2), (1, 0.0, 0), (1, 1 / 3, 2), (1, 1.0, 0), (1, 2 / 3, 1), (1, 1.0, 2)])
    recipe = genome.decode(x)
    model = AutoModelForCausalLM.from_pretrained(refs[0], dtype=torch.float32).eval()
    spec = StackingSpec(tuple(StackingSource(r, path=Path(r)) for r in refs), max_layers=6)
    stack = StackedModel(model, spec, dtype=torch.bfloat16)
    plan = layer_plan(recipe, refs)
    stack.apply(plan)
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    q = model.model.layers[4].self_attn.q_proj.weight
    assert q.data_ptr() == stack.tensors[1]["model.layers.2.self_attn.q_proj.weight"].data_ptr()

    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    assert merge_yaml([str(tmp_path / "recipe.yml"), str(tmp_path / "merged"), "-q"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 17, 40, 33, 99, 5, 2]])
    assert torch.equal(_logits(model, ids), _logits(merged, ids))
    identity = StackingGenome(refs, 4)  # 4 slots: the start point is the first source itself
    stack.apply(layer_plan(identity.decode(identity.initial_point(False, np.random.default_rng(0))), refs))
    spatial = AutoModelForCausalLM.from_pretrained(refs[0], dtype=torch.bfloat16).float().eval()
    assert torch.equal(_logits(model, ids), _logits(spatial, ids))  # back to the first source (bf16)


# -- whole runs ---------------------------------------------------------------------------------------


def _config(tmp_path: Path, zoo_dir: Path, **stacking) -> Path:
    data = yaml.safe_load((REPO / "configs" / "toy_stacking.yml").read_text())
    data["stacking"]["sources"] = [str(zoo_dir / Path(s).name) for s in data["stacking"]["sources"]]
    data["stacking"].update(stacking)
    data["limit"] = 40
    path = tmp_path / "stacking.yml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_the_toy_stacking_config_runs_exports_and_round_trips(zoo_dir, tmp_path, capsys, request):
    from transformers import AutoModelForCausalLM

    store = tmp_path / "run"
    assert merge_evolve([str(_config(tmp_path, zoo_dir)), "--storage-path", str(store), "--no-ray", "-q",
                         "--max-fevals", "16", "--no-baselines"]) == 0
    best = yaml.safe_load((store / "best_config.yaml").read_text())
    assert best["merge_method"] == "passthrough" and all(len(s["sources"]) == 1 for s in best["slices"])
    final = AutoModelForCausalLM.from_pretrained(store / "final_model")
    depth = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in best["slices"])
    assert final.config.num_hidden_layers == depth
    assert merge_yaml([str(store / "best_config.yaml"), str(tmp_path / "again"), "-q"]) == 0
    from safetensors.torch import load_file

    ours = load_file(tmp_path / "again" / "model.safetensors")
    saved = load_file(store / "final_model" / "model.safetensors")
    assert ours.keys() == saved.keys() and all(torch.equal(ours[k], saved[k]) for k in ours)
    ledger = [json.loads(line) for line in (store / "evaluations.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "train" for r in ledger) == 16
    assert all(r["status"] == "ok" for r in ledger if r["kind"] == "train")
    assert all("merge" in r["timings"] and r["timings"]["merge"] < 0.5 for r in ledger
               if r["kind"] == "train" and not r.get("cached_from"))  # no merge: pointers

    mergekit = request.getfixturevalue("mergekit_py")
    out = tmp_path / "mergekit"
    done = subprocess.run([mergekit, "-m", "mergekit.scripts.run_yaml", str(store / "best_config.yaml"), str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = {}
    for f in out.glob("*.safetensors"):
        theirs.update(load_file(f))
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_the_baselines_are_the_sources_and_the_start_stack(zoo_dir, tmp_path):
    from types import SimpleNamespace

    from evolve.baselines import START_STACK, baseline_jobs, baseline_summary
    from evolve.config import parse_evolve_config
    from evolve.html_report.page import headline
    from evolve.preflight import CheckedModels

    config = parse_evolve_config(yaml.safe_load(_config(tmp_path, zoo_dir).read_text()))
    refs = config.stacking.sources
    genome = StackingGenome(refs, 4, slots=config.stacking.slots, min_layers=config.stacking.min_layers)
    jobs = baseline_jobs(config, CheckedModels({}, 4, refs[0]), genome)
    assert [(j.name, j.role) for j in jobs] == [("spatial", "model"), ("arith", "model"), ("format", "model"),
                                                (START_STACK, START_STACK)]
    assert jobs[-1].recipe == genome.decode(genome.initial_point(False, np.random.default_rng(0)))
    # The report names it for what it is, never "every model weighted 1/M".
    records = [{"kind": "baseline", "eval_id": f"baseline/{j.name}", "name": j.name, "model": j.model,
                "role": j.role, "task_set": "train", "status": "ok", "fitness": f, "scores": {}}
               for j, f in zip(jobs, (0.49, 0.43, 0.49, 0.46))]
    data = SimpleNamespace(best=None, best_held_out=None, train=[], manifest={}, baselines=baseline_summary(records))
    page = headline(data, {"best_parent": "spatial", "gain_over_best_parent": None,
                           "held_out_gain_over_best_parent": None})
    assert "start stack" in page and "0.4600" in page and "1/M" not in page


@pytest.mark.parametrize("change, field", [
    ({"max_layers": 9}, "stacking.max_layers"),
    ({"min_layers": 5, "max_layers": 4}, "stacking.max_layers"),
    ({"slots": 0}, "stacking.slots"),
])
def test_bad_depth_bounds_name_the_field(zoo_dir, tmp_path, capsys, change, field):
    store = tmp_path / "run"
    assert merge_evolve([str(_config(tmp_path, zoo_dir, **change)), "--storage-path", str(store), "--no-ray",
                         "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"merge-evolve: error: {field}") and len(err.splitlines()) == 1
    assert not store.exists()


def test_incompatible_sources_name_the_source(zoo_dir, tmp_path, capsys, tiny_models):
    other_vocab = tmp_path / "other"
    shutil.copytree(tiny_models["a"], other_vocab)  # another shape and tokenizer entirely
    config = _config(tmp_path, zoo_dir)
    data = yaml.safe_load(config.read_text())
    data["stacking"]["sources"][1] = str(other_vocab)
    config.write_text(yaml.safe_dump(data))
    assert merge_evolve([str(config), "--storage-path", str(tmp_path / "run"), "--no-ray", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("merge-evolve: error: stacking.sources[1]: ") and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_vllm_is_refused_at_config_time(zoo_dir, tmp_path, capsys, monkeypatch):
    import evolve.flag_checks

    monkeypatch.setattr(evolve.flag_checks, "vllm_available", lambda: True)
    assert merge_evolve([str(_config(tmp_path, zoo_dir)), "--storage-path", str(tmp_path / "run"), "--vllm",
                         "-q"]) == 2
    assert "HF backend" in capsys.readouterr().err


@pytest.mark.slow
def test_a_parameter_space_result_is_a_source(zoo_dir, tmp_path):
    """PS+DFS: the stack's sources include a recipe (here a task-arithmetic merge of the zoo)."""
    recipe = {"merge_method": "task_arithmetic", "base_model": str(zoo_dir / "base"), "dtype": "bfloat16",
              "models": [{"model": str(zoo_dir / n), "parameters": {"weight": 1.0}} for n in ("spatial", "format")]}
    (tmp_path / "ps.yml").write_text(yaml.safe_dump(recipe))
    config = _config(tmp_path, zoo_dir)
    data = yaml.safe_load(config.read_text())
    data["stacking"]["sources"] = [str(tmp_path / "ps.yml"), str(zoo_dir / "arith")]
    config.write_text(yaml.safe_dump(data))
    store = tmp_path / "run"
    assert merge_evolve([str(config), "--storage-path", str(store), "--no-ray", "-q", "--max-fevals", "8",
                         "--no-baselines", "--no-save-final-model"]) == 0
    written = store / "sources" / "0-ps"
    assert (written / "config.json").is_file()
    best = yaml.safe_load((store / "best_config.yaml").read_text())
    named = {s["sources"][0]["model"] for s in best["slices"]}
    assert named <= {str(written.resolve()), str(zoo_dir / "arith")}
    assert merge_yaml([str(store / "best_config.yaml"), str(tmp_path / "out"), "-q"]) == 0


def test_a_deeper_stack_of_an_architecture_with_per_layer_attention_kinds(tmp_path):
    # Qwen2's decoder looks up config.layer_types[i] for every layer: a stack deeper than its
    # sources must carry one kind per stacked layer, the kind of the layer it runs.
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from evolve.workers.stacking import StackedModel, StackingSource, StackingSpec

    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    refs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        Qwen2ForCausalLM(config).save_pretrained(tmp_path / f"q{seed}")
        refs.append(str(tmp_path / f"q{seed}"))
    model = Qwen2ForCausalLM.from_pretrained(refs[0], dtype=torch.float32).eval()
    stack = StackedModel(model, StackingSpec(tuple(StackingSource(r, path=Path(r)) for r in refs), max_layers=3),
                         dtype=None)
    plan = [(0, 0), (1, 1), (0, 1)]
    stack.apply(plan)
    assert model.config.layer_types == ["full_attention"] * 3
    # The same model built as a plain 3-layer Qwen2 from the sources' tensors gives the same logits.
    deep = Qwen2ForCausalLM(Qwen2Config(**{**config.to_dict(), "num_hidden_layers": 3,
                                           "layer_types": None})).eval()
    from safetensors.torch import load_file

    tensors = [load_file(Path(r) / "model.safetensors") for r in refs]
    state = {k: v for k, v in tensors[0].items() if not k.startswith("model.layers.")}
    state["model.norm.weight"], state["lm_head.weight"] = tensors[0]["model.norm.weight"], tensors[0]["lm_head.weight"]
    for k, (source, layer) in enumerate(plan):
        prefix = f"model.layers.{layer}."
        state.update({f"model.layers.{k}." + n[len(prefix):]: t for n, t in tensors[source].items()
                      if n.startswith(prefix)})
    missing, unexpected = deep.load_state_dict(state, strict=False)
    assert not unexpected and all(not k.startswith("model.") for k in missing), (missing, unexpected)
    ids = torch.tensor([[1, 7, 30, 12, 5]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, deep(ids).logits, atol=1e-5)
