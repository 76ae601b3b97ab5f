"""Run storage: durable ledger with torn-line recovery, atomic state, manifest checks, best config."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from evolve import storage as storage_mod
from evolve.storage import RunStorage, StorageError, first_difference


def test_ledger_round_trip_in_order(tmp_path):
    st = RunStorage(tmp_path / "run")
    assert st.load_evaluations() == []
    records = [{"eval_id": f"e{i}", "fitness": i / 3, "scores": {"t": {"acc,none": 0.5}}} for i in range(5)]
    for r in records:
        st.append_evaluation(r)
    assert RunStorage(tmp_path / "run").load_evaluations() == records
    with pytest.raises(ValueError):  # NaN is not JSON: refuse rather than write an unreadable line
        st.append_evaluation({"eval_id": "bad", "fitness": float("nan")})
    assert len(RunStorage(tmp_path / "run").load_evaluations()) == 5


@pytest.mark.parametrize("tail", [b'{"eval_id": "e2", "fit', b"{", b'{"eval_id": "e2"}', b"\x00\x00\x00\n"])
def test_torn_last_line_is_truncated_and_appends_continue(tmp_path, tail):
    st = RunStorage(tmp_path)
    st.append_evaluation({"eval_id": "e0"})
    st.append_evaluation({"eval_id": "e1"})
    with open(st.ledger_path, "ab") as fh:
        fh.write(tail)  # a kill in the middle of an append (or a zero-filled block after a crash)
    resumed = RunStorage(tmp_path)
    assert [r["eval_id"] for r in resumed.load_evaluations()] == ["e0", "e1"]
    resumed.append_evaluation({"eval_id": "e2"})
    assert [r["eval_id"] for r in RunStorage(tmp_path).load_evaluations()] == ["e0", "e1", "e2"]
    assert st.ledger_path.read_bytes().count(b"\n") == 3


def test_append_without_load_still_repairs_a_torn_tail(tmp_path):
    st = RunStorage(tmp_path)
    st.append_evaluation({"eval_id": "e0"})
    with open(st.ledger_path, "ab") as fh:
        fh.write(b'{"eval_id": "half')
    RunStorage(tmp_path).append_evaluation({"eval_id": "e1"})
    assert [r["eval_id"] for r in RunStorage(tmp_path).load_evaluations()] == ["e0", "e1"]


def test_corrupt_middle_line_is_an_error(tmp_path):
    st = RunStorage(tmp_path)
    st.ledger_path.write_bytes(b'{"eval_id": "e0"}\nnot json\n{"eval_id": "e2"}\n')
    with pytest.raises(StorageError, match="line 2 of 3 is not a JSON record: the ledger is damaged"):
        st.load_evaluations()


def test_the_manifest_is_replaced_atomically(tmp_path, monkeypatch):
    st = RunStorage(tmp_path)
    assert st.read_manifest() is None
    st.write_manifest({"n": 1})
    st.write_manifest({"n": 2})
    assert st.read_manifest() == {"n": 2}

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(storage_mod.os, "replace", boom)
    with pytest.raises(OSError):
        st.write_manifest({"n": 3})
    monkeypatch.undo()
    assert st.read_manifest() == {"n": 2}
    assert sorted(os.listdir(tmp_path)) == ["run.json"]  # no temp file left behind


def test_reading_a_run_creates_nothing(tmp_path):
    st = RunStorage(tmp_path / "not-yet")
    assert st.load_evaluations() == [] and st.read_manifest() is None
    assert not (tmp_path / "not-yet").exists()


def manifest(**overrides):
    m = {"config": {"tasks": [{"name": "t", "weight": 0.4}], "genome": {"models": ["a", "b"]}}, "seed": 0,
         "popsize": 8, "max_fevals": 100, "versions": {"cma": "4.5.0"}, "started": "2026-01-01"}
    m.update(overrides)
    return m


def test_manifest_new_same_and_extended_budget(tmp_path):
    st = RunStorage(tmp_path)
    keys = ("config", "seed", "popsize")
    assert st.open_run(manifest(), keys) == manifest()
    assert st.open_run(manifest(started="later"), keys)["started"] == "2026-01-01"  # the first start is kept
    out = st.open_run(manifest(max_fevals=300, started="later"), keys)
    assert out["max_fevals"] == 300 and st.read_manifest()["max_fevals"] == 300


@pytest.mark.parametrize("change, where", [
    ({"seed": 1}, "seed differs from the stored run (0 there, 1 now)"),
    ({"config": {"tasks": [{"name": "t", "weight": 0.5}], "genome": {"models": ["a", "b"]}}},
     "config.tasks[0].weight differs from the stored run (0.4 there, 0.5 now)"),
    ({"config": {"tasks": [{"name": "t", "weight": 0.4}], "genome": {"models": ["a", "b", "c"]}}},
     "config.genome.models (length 2 vs 3) differs"),
])
def test_resume_with_other_settings_is_refused_naming_the_difference(tmp_path, change, where):
    st = RunStorage(tmp_path)
    st.open_run(manifest(), ("config", "seed", "popsize"))
    with pytest.raises(StorageError) as info:
        st.open_run(manifest(**change), ("config", "seed", "popsize"))
    text = str(info.value)
    assert "\n" not in text and "cannot resume" in text and where in text, text


def test_ledger_without_manifest_is_refused(tmp_path):
    st = RunStorage(tmp_path)
    st.append_evaluation({"eval_id": "e0"})
    with pytest.raises(StorageError, match="no run.json"):
        RunStorage(tmp_path).open_run(manifest(), ("seed",))


def test_first_difference():
    assert first_difference({"a": [1, 2]}, {"a": [1, 2]}) is None
    assert first_difference({"a": [1, 2]}, {"a": [1, 3]}) == "a[1]"
    assert first_difference({"a": 1}, {"a": 1, "b": 2}) == "b"
    assert first_difference(1, 1.0) == "<root>"  # 1 vs 1.0 came from different inputs


def test_best_config_has_provenance_comments_and_sidecar(tmp_path):
    st = RunStorage(tmp_path)
    recipe = {"merge_method": "ties", "base_model": "base",
              "slices": [{"sources": [{"model": "a", "layer_range": [0, 4], "parameters": {"weight": 0.5}}]}]}
    provenance = {"seed": 3, "config_hash": "abc", "tasks": [{"name": "t", "weight": 1.0}],
                  "train_fitness": 0.75, "held_out_scores": {"h": {"acc,none": 0.5}},
                  "evaluations_used": {"train": 40}, "versions": {"cma": "4.5.0"}}
    path = st.write_best_config(yaml.safe_dump(recipe, sort_keys=False), provenance)
    text = path.read_text()
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line[2:] if line.startswith("# ") else "")
    assert yaml.safe_load(text) == recipe  # comments do not change what mergekit-yaml reads
    assert yaml.safe_load("\n".join(header[1:])) == provenance
    assert json.loads((tmp_path / "best_config.provenance.json").read_text()) == provenance


def _train(eval_id, fitness, *, stopped=False, status="ok"):
    rec = {"eval_id": eval_id, "kind": "train", "status": status, "fitness": fitness, "scores": {"t": fitness},
           "generation": 0, "index": 0, "cached_from": None}
    if stopped:
        rec["race"] = {"stopped": True, "high": fitness + 0.01, "threshold": 0.8}
    return rec


def test_both_reports_name_the_best_that_best_config_holds(tmp_path):
    """The incumbent best_config names, not a later untold result nor a raced estimate; without a
    best_config yet, the best result scored on every document."""
    from evolve.html_report.run_data import load_run
    from evolve.report import summarize
    from evolve.storage import BEST_PROVENANCE, best_record

    st = RunStorage(tmp_path)
    records = [_train("c0", 0.6), _train("c1", 0.7), _train("c2", 0.95, stopped=True), _train("c3", 0.9),
               _train("c4", -2.0, status="failed")]
    for rec in records:
        st.append_evaluation(rec)
    assert best_record(records, None)["eval_id"] == "c3"  # not the estimate c2
    (tmp_path / BEST_PROVENANCE).write_text(json.dumps({"eval_id": "c1", "train_fitness": 0.7}))
    summary = summarize(tmp_path)
    assert summary["best"]["eval_id"] == "c1" == load_run(tmp_path, live=False).best["eval_id"]
    assert [r["eval_id"] for r in summary["top"]] == ["c3", "c1", "c0"]  # scored in full, best first
    (tmp_path / BEST_PROVENANCE).write_text("{torn")
    assert summarize(tmp_path)["best"]["eval_id"] == "c3" == load_run(tmp_path, live=False).best["eval_id"]
