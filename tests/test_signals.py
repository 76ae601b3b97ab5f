"""A run stopped as schedulers stop it: SIGTERM, SIGHUP, a second signal, during the search (local
and Ray workers, the signal to the driver or to its whole process group) and during the final
model's export.  Each ends with 128 + the signal, one line, nothing lost, and resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lm_eval")

from evolve.cli import main as merge_evolve  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _config(models: dict[str, Path], path: Path) -> Path:
    data = {"genome": {"models": [str(models["e1"]), str(models["e2"])], "merge_method": "task_arithmetic",
                       "base_model": str(models["base"]), "layer_granularity": 2},
            "tasks": [{"name": "toy_arith"}], "held_out": [{"name": "toy_arith_heldout"}],
            "limit": 16, "apply_chat_template": False}
    path.write_text(yaml.safe_dump(data))
    return path


def _argv(config: Path, store: Path, *extra: str) -> list[str]:
    return [str(config), "--storage-path", str(store), "-q", "--force-population-size", "4",
            "--no-save-final-model", "--no-baselines", *extra]


def _ledger(store: Path) -> list[dict]:
    path = store / "evaluations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _start(argv: list[str], *, group: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "evolve.cli", *argv], cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=group)


def _wait_for_results(proc: subprocess.Popen, store: Path, count: int, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if sum(r.get("kind") == "train" for r in _ledger(store)) >= count:
            return
        assert proc.poll() is None, f"the run ended early: {proc.communicate()}"
        time.sleep(0.2)
    raise AssertionError("the run scored nothing in time")


def _stop(proc: subprocess.Popen, signum: int, *, group: bool = False) -> tuple[int, str, float]:
    start = time.monotonic()
    if group:
        os.killpg(proc.pid, signum)  # as Slurm and `kill -- -PGID` do: every process of the job
    else:
        proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, time.monotonic() - start


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (its SigCgt mask in /proc); False
    once it has ended."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (signum - 1) & 1)


def _assert_resumes(config: Path, store: Path, budget: int, *extra: str) -> None:
    """The same command continues to the budget; no candidate is scored twice."""
    assert merge_evolve(_argv(config, store, "--no-ray", "--max-fevals", str(budget), *extra)) == 0
    train = [r for r in _ledger(store) if r.get("kind") == "train"]
    ids = [r["eval_id"] for r in train]
    assert len(ids) == len(set(ids)) == budget


@pytest.mark.slow
@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_terminated_local_run_exits_with_the_signal_status_and_resumes(task_models, tmp_path, signum, status):
    config, store = _config(task_models, tmp_path / "c.yml"), tmp_path / "run"
    proc = _start(_argv(config, store, "--no-ray", "--max-fevals", "200"))
    _wait_for_results(proc, store, 3)
    code, err, took = _stop(proc, signum)
    name = signal.Signals(signum).name
    assert code == status, err
    assert err.strip() == (f"merge-evolve: stopped by {name}; what was recorded is intact: run the same command "
                           "again to resume")
    assert took < 30
    done = sum(r.get("kind") == "train" for r in _ledger(store))
    assert 3 <= done < 200
    _assert_resumes(config, store, done + 4)


@pytest.mark.slow
def test_sigterm_to_a_ray_runs_process_group_leaves_nothing_running_and_resumes(task_models, tmp_path):
    import psutil

    config, store = _config(task_models, tmp_path / "c.yml"), tmp_path / "run"
    proc = _start(_argv(config, store, "--num-workers", "2", "--max-fevals", "200"), group=True)
    _wait_for_results(proc, store, 3)
    children = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    code, err, took = _stop(proc, signal.SIGTERM, group=True)
    assert code == 143, err
    assert "Traceback" not in err and "SIGTERM received" not in err, err
    assert err.strip().splitlines()[-1].startswith("merge-evolve: stopped by SIGTERM; what was recorded is intact")
    assert took < 30  # within the grace period schedulers give before SIGKILL
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                              for p in children):
        time.sleep(0.5)
    left = [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not left
    done = sum(r.get("kind") == "train" for r in _ledger(store))
    assert not any(r.get("status") == "failed" for r in _ledger(store)), "a cancelled candidate was ledgered as failed"
    _assert_resumes(config, store, done + 4)


@pytest.mark.slow
def test_sigterm_to_a_ray_driver_alone_exits_143(task_models, tmp_path):
    config, store = _config(task_models, tmp_path / "c.yml"), tmp_path / "run"
    proc = _start(_argv(config, store, "--num-workers", "1", "--max-fevals", "200"))
    _wait_for_results(proc, store, 2)
    code, err, took = _stop(proc, signal.SIGTERM)
    assert code == 143 and "Traceback" not in err, err
    assert took < 30


@pytest.mark.slow
def test_a_second_signal_ends_the_run_at_once_and_nothing_is_lost(task_models, tmp_path):
    config, store = _config(task_models, tmp_path / "c.yml"), tmp_path / "run"
    proc = _start(_argv(config, store, "--num-workers", "1", "--max-fevals", "200"))
    _wait_for_results(proc, store, 2)
    proc.send_signal(signal.SIGTERM)
    # Two signals sent before Python runs its handler count as one: wait until the first was
    # handled (SIGTERM no longer caught: its default action is back), then the cleanup (closing
    # Ray) still has seconds to go and the second lands in it.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _catches(proc.pid, signal.SIGTERM):
        time.sleep(0.05)
    assert not _catches(proc.pid, signal.SIGTERM), "the first SIGTERM was never handled"
    code, err, took = _stop(proc, signal.SIGTERM)
    # Ended by the signal itself (the default action the first one set): a shell reports 143.
    assert code == -signal.SIGTERM, err
    assert "Traceback" not in err and took < 5, err
    done = sum(r.get("kind") == "train" for r in _ledger(store))
    _assert_resumes(config, store, done + 4)


def test_sigterm_during_the_final_export_leaves_no_half_model_and_the_rerun_writes_it(
        task_models, tmp_path, monkeypatch, capsys):
    from merge_core import writer

    config, store = _config(task_models, tmp_path / "c.yml"), tmp_path / "run"
    argv = [a for a in _argv(config, store, "--no-ray", "--max-fevals", "4") if a != "--no-save-final-model"]
    real_add = writer.ShardedModelWriter.add
    sent: list[int] = []

    def add_then_signal(self, name, tensor):  # the scheduler's SIGTERM arrives mid-export
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_add(self, name, tensor)

    monkeypatch.setattr(writer.ShardedModelWriter, "add", add_then_signal)
    previous = signal.getsignal(signal.SIGTERM)
    assert merge_evolve(argv) == 143
    assert signal.getsignal(signal.SIGTERM) == previous  # the handlers of the caller are back
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert sent and not (store / "final_model").exists()
    assert not [p for p in store.iterdir() if p.name.startswith(".") and p.name != ".lock"], list(store.iterdir())
    monkeypatch.setattr(writer.ShardedModelWriter, "add", real_add)
    assert merge_evolve(argv) == 0
    assert (store / "final_model" / "config.json").is_file()
