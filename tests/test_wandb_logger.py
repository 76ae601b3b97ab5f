"""W&B logging (``--wandb``) with a real wandb in offline mode: no key, no network.

One W&B run per storage path (resume continues it), W&B's environment variables honoured, and
the genome table's columns named by gene.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

wandb = pytest.importorskip("wandb")

from evolve.config import parse_evolve_config  # noqa: E402
from evolve.genome import Genome  # noqa: E402
from evolve.observers.wandb_logger import RUN_ID_FILE, WandbObserver  # noqa: E402

CONFIG = parse_evolve_config({
    "genome": {"models": ["zoo/spatial", "zoo/arith"], "base_model": "zoo/base", "merge_method": "ties",
               "layer_granularity": 2},
    "tasks": ["toy_arith"],
})


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _observe(store: Path, **kwargs: object) -> tuple[str, str, str | None]:
    """(run id, project, group) of a WandbObserver on ``store``, finished again."""
    store.mkdir(parents=True, exist_ok=True)
    obs = WandbObserver(CONFIG, project=kwargs.get("project"), entity=kwargs.get("entity"), run_dir=store, seed=0)
    try:
        return obs.run.id, obs.run.project, obs.run.group or None
    finally:
        obs.close()


def test_one_run_per_storage_path_and_resume_continues_it(offline, tmp_path: Path) -> None:
    first, _, _ = _observe(tmp_path / "a")
    second, _, _ = _observe(tmp_path / "b")  # same config and seed, another storage path
    assert first != second
    assert (tmp_path / "a" / RUN_ID_FILE).read_text().strip() == first
    resumed, _, _ = _observe(tmp_path / "a")
    assert resumed == first
    # W&B wrote into the run directory (WANDB_DIR unset)
    assert (tmp_path / "a" / "wandb").is_dir()


def test_wandb_environment_is_honoured(offline, tmp_path: Path) -> None:
    offline.setenv("WANDB_PROJECT", "from-env")
    offline.setenv("WANDB_RUN_GROUP", "sweep-7")
    offline.setenv("WANDB_DIR", str(tmp_path / "wandb-files"))
    (tmp_path / "wandb-files").mkdir()
    _, project, group = _observe(tmp_path / "run")
    assert project == "from-env" and group == "sweep-7"
    assert (tmp_path / "wandb-files" / "wandb").is_dir() and not (tmp_path / "run" / "wandb").exists()
    _, project, _ = _observe(tmp_path / "run", project="flag")  # --wandb-project wins
    assert project == "flag"
    offline.setenv("WANDB_RUN_ID", "chosen-id")
    run_id, _, _ = _observe(tmp_path / "other")
    assert run_id == "chosen-id"


def test_entity_from_the_environment(offline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """WANDB_ENTITY reaches wandb.init when --wandb-entity is not given (the flag wins)."""
    seen: list[dict] = []
    real_init = wandb.init

    def spy(**kwargs: object):
        seen.append(kwargs)
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", spy)
    offline.setenv("WANDB_ENTITY", "team-env")
    _observe(tmp_path / "run")
    _observe(tmp_path / "run", entity="team-flag")
    assert [s["entity"] for s in seen] == ["team-env", "team-flag"]


def test_genome_table_columns_are_gene_names(offline, tmp_path: Path) -> None:
    genome = Genome(CONFIG.genome, num_layers=4)
    store = tmp_path / "run"
    store.mkdir()
    obs = WandbObserver(CONFIG, project=None, entity=None, run_dir=store, seed=0)
    logged: list[dict] = []
    obs.run.log = logged.append  # what would be sent
    try:
        obs.on_start(SimpleNamespace(genome=genome, records={}))
        x = genome.initial_point(False, np.random.default_rng(0))
        records = [{"eval_id": f"e{i}", "fitness": 0.5, "status": "ok", "x": x, "scores": {"toy_arith": 0.5}}
                   for i in range(2)]
        obs.on_generation(0, records, 0.2)
    finally:
        obs.close()
    table = logged[-1]["gen/genomes"]
    assert table.columns[:3] == ["eval_id", "fitness", "status"]
    assert table.columns[3:] == genome.gene_names()
    assert table.columns[3:7] == ["g0/spatial/weight", "g0/spatial/density", "g0/arith/weight", "g0/arith/density"]


def test_a_pareto_run_logs_its_hypervolume_and_front(offline, tmp_path: Path) -> None:
    from evolve.search.objectives import Objectives

    config = parse_evolve_config({**CONFIG.model_dump(), "tasks": ["toy_arith", "toy_spatial"],
                                  "search": {"objectives": "pareto"}})
    genome = Genome(config.genome, num_layers=4)
    store = tmp_path / "run"
    store.mkdir()
    obs = WandbObserver(config, project=None, entity=None, run_dir=store, seed=0)
    logged: list[dict] = []
    obs.run.log = logged.append
    x = genome.initial_point(False, np.random.default_rng(0))

    def rec(i: int, a: float, s: float) -> dict:
        return {"eval_id": f"e{i}", "kind": "train", "fitness": a + s, "status": "ok", "x": x, "seq": i,
                "recipe_hash": f"h{i}", "cached_from": None,
                "scores": {"toy_arith": {"acc,none": a}, "toy_spatial": {"acc,none": s}}}

    try:
        obs.on_start(SimpleNamespace(genome=genome, records={}, objectives=Objectives(config)))
        records = [rec(0, 0.5, 0.5), rec(1, 1.0, 0.2), rec(2, 0.4, 0.4)]
        for r in records:
            obs.on_record(r)
        obs.on_generation(0, records, 0.2)
    finally:
        obs.close()
    assert [d["pareto/hypervolume"] for d in logged[:3]] == pytest.approx([0.25, 0.25 + 0.5 * 0.2, 0.35])
    assert logged[2]["pareto/front_size"] == 2
    table = logged[-1]["pareto/front"]
    assert table.columns == ["eval_id", "fitness", "toy_arith", "toy_spatial"]
    assert [row[0] for row in table.data] == ["e0", "e1"]
