"""The evaluation seed is lm-eval's (1234: few-shot sampling, numpy, torch), not the search seed.

lm-eval and mergekit-evolve sample few-shot examples with seed 1234 whatever else is seeded; a
run used to pass ``--random-seed`` there, so the objective changed with the search seed.  Now
the config's ``fewshot_seed`` (default 1234) seeds evaluation, a run records it (``run.json``,
``best_config`` provenance), and a run stored before keeps the seed it was scored with.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evolve.config import FEWSHOT_SEED, config_hash, fewshot_seed_of, normalized_config, parse_evolve_config
from evolve.evaluation import EvalSettings

BASE = {"genome": {"models": ["a", "b"], "merge_method": "task_arithmetic", "base_model": "c"}, "tasks": ["t"]}


def test_default_is_lm_evals_seed_and_the_config_can_set_it() -> None:
    plain = parse_evolve_config(BASE)
    assert FEWSHOT_SEED == 1234
    assert fewshot_seed_of(plain, None) == 1234 and EvalSettings.from_config(plain).seed == 1234
    seeded = parse_evolve_config({**BASE, "fewshot_seed": 99})
    assert fewshot_seed_of(seeded, None) == 99 and EvalSettings.from_config(seeded).seed == 99
    # a stored run keeps what it recorded; one stored before the seed was recorded used its search seed
    assert fewshot_seed_of(plain, {"seed": 5, "fewshot_seed": 1234}) == 1234
    assert fewshot_seed_of(plain, {"seed": 5}) == 5
    assert fewshot_seed_of(seeded, {"seed": 5}) == 99


def test_configs_without_the_field_hash_as_before() -> None:
    """``fewshot_seed`` is left out of the hashed form when unset, so stored runs still resume."""
    assert "fewshot_seed" not in normalized_config(parse_evolve_config(BASE))
    with_seed = parse_evolve_config({**BASE, "fewshot_seed": 1234})
    assert normalized_config(with_seed)["fewshot_seed"] == 1234
    assert config_hash(with_seed) != config_hash(parse_evolve_config(BASE))


def _run(models: dict[str, Path], tmp_path: Path, name: str, seed: int) -> Path:
    from evolve.cli import main as merge_evolve

    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump({
        "genome": {"models": [str(models["e1"]), str(models["e2"])], "base_model": str(models["base"]),
                   "merge_method": "task_arithmetic", "layer_granularity": 2},
        "tasks": ["toy_arith"], "held_out": ["toy_arith_heldout"], "limit": 12, "num_fewshot": 2,
        "apply_chat_template": False}))
    store = tmp_path / name
    assert merge_evolve([str(config), "--storage-path", str(store), "--no-ray", "--max-fevals", "4",
                         "--force-population-size", "4", "--random-seed", str(seed), "-q",
                         "--no-save-final-model"]) == 0
    return store


@pytest.mark.slow
def test_scores_do_not_depend_on_the_search_seed(task_models, tmp_path: Path) -> None:
    """Two runs with other --random-seed score the same models (the baselines) the same, with
    two few-shot examples per document; both record seed 1234 as their evaluation seed."""
    pytest.importorskip("lm_eval")
    stores = [_run(task_models, tmp_path, f"s{seed}", seed) for seed in (1, 2)]
    scores = []
    for store in stores:
        ledger = [json.loads(line) for line in (store / "evaluations.jsonl").read_text().splitlines()]
        baselines = {r["eval_id"]: r["scores"] for r in ledger if r.get("kind") == "baseline"}
        assert baselines, "the run scores its input models first"
        scores.append(baselines)
        assert json.loads((store / "run.json").read_text())["fewshot_seed"] == 1234
        provenance = json.loads((store / "best_config.provenance.json").read_text())
        assert provenance["fewshot_seed"] == 1234
    assert scores[0] == scores[1]
