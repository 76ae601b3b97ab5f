"""What a run prints and writes for its user: the closing headline, a complete run's answer,
every worker's memory line, readable provenance comments, files that follow the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace

import yaml

from evolve.search.outcome import SearchOutcome
from evolve.storage import RunStorage, readable_floats
from evolve.summary import complete_lines, outcome_lines
from evolve.workers.ray_pool import memory_lines
from fake_pools import LastFirstPool
from merge_core.fsutil import atomic_write


def _baseline(name: str, role: str, train: float, held: float) -> list[dict]:
    common = {"kind": "baseline", "name": name, "model": f"zoo/{name}", "role": role, "status": "ok"}
    return [{**common, "eval_id": f"baseline/{name}", "task_set": "train", "fitness": train},
            {**common, "eval_id": f"baseline/{name}/held_out", "task_set": "held_out", "fitness": held}]


def _outcome(stop: str = "max_fevals 100 reached") -> SearchOutcome:
    return SearchOutcome(best={"eval_id": "c000041", "fitness": 0.677}, best_recipe={},
                         best_held_out={"fitness": 0.665}, generations=14, candidates=100, evaluations=97,
                         held_out_evaluations=6, stop_reason=stop, busy_fraction=0.93)


RECORDS = (_baseline("base", "base", 0.198, 0.198) + _baseline("spatial", "model", 0.49, 0.52)
           + _baseline("format", "model", 0.512, 0.503) + _baseline("equal_merge", "equal_merge", 0.7, 0.7))


def test_the_headline_is_the_gain_over_the_best_parent(tmp_path: Path) -> None:
    lines = outcome_lines(_outcome(), tmp_path, RECORDS)
    # train: format is the best parent; held-out: spatial is; the equal merge is no parent
    assert lines[0] == ("best: train 0.6770, +0.1650 over the best parent (format 0.5120); "
                        "held-out 0.6650, +0.1450 over the best parent (spatial 0.5200)")
    assert lines[1].startswith("best candidate c000041; 97 evaluations, 14 generations")
    assert outcome_lines(_outcome(), tmp_path, [])[0].endswith("(no baselines scored: the gain over the parents "
                                                                "is unknown)")


def test_a_complete_run_says_so_and_how_to_extend_it(tmp_path: Path) -> None:
    lines = complete_lines(_outcome(), tmp_path, RECORDS, max_fevals=100)
    assert lines[0].startswith("run already complete (max_fevals 100 reached; 100 candidates, 97 evaluations)")
    assert lines[0].endswith("e.g. --max-fevals 150") and lines[1].startswith("best: train 0.6770, +0.1650")
    stopped = complete_lines(_outcome("cma stop: {'tolfun': 1e-11}"), tmp_path, RECORDS, max_fevals=200)
    assert "does not continue it" in stopped[0] and "--max-fevals 1" not in stopped[0]


def test_every_worker_has_its_memory_line_equal_ones_merged() -> None:
    slots = [SimpleNamespace(name=f"worker-{i}", memory=m) for i, m in
             enumerate(["inputs resident on cuda:0 (3.1 GiB)", "inputs resident on cuda:0 (3.1 GiB)",
                        "inputs streamed from CPU memory (3.1 GiB)", ""])]
    assert memory_lines(slots) == ["worker-0, worker-1: inputs resident on cuda:0 (3.1 GiB)",
                                   "worker-2: inputs streamed from CPU memory (3.1 GiB)"]


def test_best_config_comments_show_no_float_noise(tmp_path: Path) -> None:
    noisy = {"train_fitness": 0.4 * 0.2 + 0.3 * 0.3 + 0.3 * 0.1285, "nested": [{"gain": 0.1 + 0.2}], "n": 3}
    assert readable_floats(noisy) == {"train_fitness": 0.20855, "nested": [{"gain": 0.3}], "n": 3}
    storage = RunStorage(tmp_path)
    storage.write_best_config("merge_method: linear\n", noisy)
    text = (tmp_path / "best_config.yaml").read_text()
    assert "# train_fitness: 0.20855\n" in text and "0000000" not in text
    sidecar = yaml.safe_load((tmp_path / "best_config.provenance.json").read_text())
    assert sidecar["train_fitness"] == noisy["train_fitness"]  # every bit kept there


def test_atomic_writes_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.txt", b"x")
        assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640  # not mkstemp's 0600
        os.umask(0o002)
        atomic_write(tmp_path / "b.txt", b"x")
        (tmp_path / "c.txt").write_bytes(b"x")
        os.chmod(tmp_path / "a.txt", 0o600)  # left 0600 by an earlier version: rewritten like a new file
        atomic_write(tmp_path / "a.txt", b"y")
    finally:
        os.umask(old)
    mode = {n: stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("a.txt", "b.txt", "c.txt")}
    assert mode == {"a.txt": 0o664, "b.txt": 0o664, "c.txt": 0o664}


def test_preflight_results_come_train_first_whichever_finishes_first() -> None:
    from evolve.config import TaskConfig
    from evolve.preflight import CheckedModels, preflight_evaluation

    config = SimpleNamespace(tasks=[TaskConfig(name="toy_arith")], held_out=[TaskConfig(name="toy_arith_heldout")],
                             genome=None)
    pool = LastFirstPool({"toy_arith": 0.5, "toy_arith_heldout": 0.25})  # held-out (asked last) back first
    results = preflight_evaluation(pool, config, CheckedModels({}, 4, "zoo/base"), "float32")
    assert list(results) == ["train", "held_out"]
