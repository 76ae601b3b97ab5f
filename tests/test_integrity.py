"""The integrity of a run: broken merges fail, one run per storage path, no model code runs
unasked, Ray setup errors read like any other, ``report`` writes nothing, full disks and killed
drivers leave nothing half done or running.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("lm_eval")

from evolve.cli import main as merge_evolve  # noqa: E402
from evolve.lock import RunLock  # noqa: E402
from evolve.storage import RunStorage  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _config(models: dict[str, Path], **changes) -> dict:
    data = {
        "genome": {"models": [str(models["e1"]), str(models["e2"])], "merge_method": "task_arithmetic",
                   "base_model": str(models["base"]), "layer_granularity": 2},
        "tasks": [{"name": "toy_arith"}], "held_out": [{"name": "toy_arith_heldout"}],
        "limit": 16, "apply_chat_template": False,
    }
    data.update(changes)
    return data


def _write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _argv(config: Path, store: Path, *extra: str) -> list[str]:
    return [str(config), "--storage-path", str(store), "--no-ray", "-q", "--max-fevals", "4",
            "--force-population-size", "4", "--no-save-final-model", *extra]


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def overflowing_model(src: Path, dst: Path) -> Path:
    """``src`` with the final norm and lm_head scaled by 1e30: every weight finite, every logit
    not (the log-likelihoods are NaN, and lm-eval's argmax over them still "scores")."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    sd = load_file(weights)
    for name in ("model.norm.weight", "lm_head.weight"):
        sd[name] = sd[name] * 1e30
    save_file(sd, weights, metadata={"format": "pt"})
    return dst


# -- non-finite scores ------------------------------------------------------------------------


def test_candidates_of_an_overflowing_model_all_fail_and_scoring_recovers(task_models, tmp_path):
    from evolve.config import parse_evolve_config
    from evolve.evaluation import EvalSettings
    from evolve.genome import Genome
    from evolve.protocols import TRAIN
    from evolve.search import SearchDriver
    from evolve.search.failures import SystematicFailure
    from evolve.workers import CandidateWorker, LocalPool, WorkerSpec

    broken = overflowing_model(task_models["e1"], tmp_path / "broken")
    config = parse_evolve_config({"genome": {"models": [str(broken), str(task_models["e2"])],
                                             "merge_method": "linear", "layer_granularity": 2},
                                  "tasks": ["toy_arith"], "limit": 8, "apply_chat_template": False})
    genome = Genome(config.genome, 4)
    template = genome.decode(genome.initial_point(False, np.random.default_rng(0)))
    spec = WorkerSpec(template_recipe=template, settings=EvalSettings.from_config(
        config, device="cpu", builtin_tasks=False, batch_size=8), train_tasks=list(config.tasks), threads=1)
    pool = LocalPool(spec)
    try:
        # Every candidate holds the broken model, so the run stops as systematic after the first 4.
        with pytest.raises(SystematicFailure, match="NaN or infinite"):
            SearchDriver(genome, RunStorage(tmp_path / "run"), config, popsize=4, max_fevals=8, seed=0).run(pool)
        worker: CandidateWorker = pool.worker
        healthy = {"merge_method": "linear", "dtype": "bfloat16",
                   "models": [{"model": str(task_models["e2"]), "parameters": {"weight": 1.0}}]}
        again = worker.run("healthy", healthy, TRAIN)
        assert again.status == "ok", again.reason
        assert worker.evaluator.lm.share_context, "a NaN candidate switched shared-context scoring off"
    finally:
        pool.close()
    ledger = [r for r in RunStorage(tmp_path / "run").load_evaluations() if r["kind"] == "train"]
    assert len(ledger) == 4 and all(r["status"] == "failed" and "NaN or infinite" in r["reason"] for r in ledger)
    assert not (tmp_path / "run" / "best_config.yaml").exists()


def test_preflight_refuses_an_overflowing_base_model(task_models, tmp_path, capsys):
    broken = overflowing_model(task_models["base"], tmp_path / "broken")
    config = _write_config(tmp_path / "c.yml", _config(task_models, genome={
        "models": [str(task_models["e1"]), str(task_models["e2"])], "merge_method": "task_arithmetic",
        "base_model": str(broken)}))
    assert merge_evolve(_argv(config, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "preflight" in err and "NaN or infinite" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


# -- one run per storage path -----------------------------------------------------------------


def test_a_second_run_on_a_locked_storage_path_is_refused(task_models, tmp_path, capsys):
    store = tmp_path / "run"
    store.mkdir()
    config = _write_config(tmp_path / "c.yml", _config(task_models))
    with RunLock(store):
        before = _tree(store)
        assert merge_evolve(_argv(config, store)) == 2
        err = capsys.readouterr().err.strip()
        assert f"is in use by pid {os.getpid()} on " in err and len(err.splitlines()) == 1
        assert _tree(store) == before
    assert merge_evolve(_argv(config, store)) == 0  # released: the same command now runs


def test_the_lock_of_a_killed_holder_is_taken_over(task_models, tmp_path):
    store = tmp_path / "run"
    store.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from evolve.lock import RunLock;"
         "RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(600)", str(store)],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(Exception, match=f"in use by pid {holder.pid}"):
        RunLock(store).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = RunLock(store).acquire()  # the kernel dropped the dead process's lock
    try:
        assert (store / ".lock").read_text().startswith(f"pid {os.getpid()} ")
    finally:
        lock.release()


# -- no model code unless asked ----------------------------------------------------------------


def _custom_code_model(src: Path, dst: Path, marker: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "configuration_evil.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('the model folder ran its code')\n"
        "from transformers import LlamaConfig\n\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n")
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                            "AutoModelForCausalLM": "modeling_llama.LlamaForCausalLM"})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_no_prompt_runs_model_code(task_models, tmp_path):
    marker = tmp_path / "ran"
    evil = _custom_code_model(task_models["base"], tmp_path / "evil", marker)
    # The folder is armed: asked without an explicit answer, transformers prompts and a piped
    # "y" runs the folder's code.
    probe = subprocess.run([sys.executable, "-c", "import sys; from transformers import AutoConfig;"
                            "AutoConfig.from_pretrained(sys.argv[1])", str(evil)],
                           input="y\n", capture_output=True, text=True, timeout=120, env={**os.environ})
    assert marker.exists(), f"the positive control did not run the code: {probe.stderr[-500:]}"
    marker.unlink()
    config = _write_config(tmp_path / "c.yml", _config(task_models, genome={
        "models": [str(task_models["e1"]), str(task_models["e2"])], "merge_method": "task_arithmetic",
        "base_model": str(evil)}))
    run = subprocess.run([sys.executable, "-m", "evolve.cli", *_argv(config, tmp_path / "run")], input="y\ny\n",
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert not marker.exists(), "merge-evolve ran the model folder's code"
    assert "[y/N]" not in run.stdout + run.stderr
    assert run.returncode == 2 and "--trust-remote-code" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


# -- Ray setup errors ---------------------------------------------------------------------------


@pytest.mark.slow
def test_ray_setup_errors_read_like_the_local_ones(task_models, tmp_path):
    # A problem only a worker meets while setting itself up (the tokenizer has no chat template).
    config = _write_config(tmp_path / "c.yml", _config(task_models, apply_chat_template=True))
    lines = {}
    for mode in ("--no-ray", "--num-workers=2"):
        argv = [a for a in _argv(config, tmp_path / f"run{mode}") if a != "--no-ray"] + [mode]
        run = subprocess.run([sys.executable, "-m", "evolve.cli", *argv], capture_output=True, text=True,
                             timeout=300, cwd=REPO, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        assert run.returncode == 2, run.stderr
        lines[mode] = run.stderr.strip()
        assert not (tmp_path / f"run{mode}").exists()
    assert lines["--no-ray"] == lines["--num-workers=2"]
    assert len(lines["--no-ray"].splitlines()) == 1 and "has no chat template" in lines["--no-ray"]


# -- report is read-only ------------------------------------------------------------------------


def test_report_leaves_the_run_directory_byte_identical(task_models, tmp_path, capsys):
    store = tmp_path / "run"
    config = _write_config(tmp_path / "c.yml", _config(task_models))
    assert merge_evolve(_argv(config, store)) == 0
    with open(store / "evaluations.jsonl", "ab") as fh:
        fh.write(b'{"eval_id": "g00009-0000", "kind": "tr')  # a torn last line
    before = _tree(store)
    capsys.readouterr()
    assert merge_evolve(["report", "--storage-path", str(store), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["evaluations"] == 4
    assert _tree(store) == before


# -- full or read-only disks ---------------------------------------------------------------------


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "No space left on device"),
                                        (errno.EROFS, "Read-only file system")])
def test_a_failing_disk_is_one_line_and_the_run_resumes(task_models, tmp_path, monkeypatch, capsys, code, words):
    store = tmp_path / "run"
    config = _write_config(tmp_path / "c.yml", _config(task_models))
    real = RunStorage.append_evaluation
    calls = {"n": 0}

    def append(self, record):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(code, os.strerror(code), str(self.ledger_path))
        real(self, record)

    monkeypatch.setattr(RunStorage, "append_evaluation", append)
    assert merge_evolve(_argv(config, store, "--max-fevals", "8")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "run the same command again" in err
    monkeypatch.setattr(RunStorage, "append_evaluation", real)
    assert merge_evolve(_argv(config, store, "--max-fevals", "8")) == 0
    ids = [r["eval_id"] for r in RunStorage(store).load_evaluations() if r["kind"] == "train"]
    assert len(ids) == 8 and len(set(ids)) == 8


# -- no Ray process outlives its driver ----------------------------------------------------------


def _session_processes(session: str) -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(session in part for part in proc.info["cmdline"] or ()):
                found.append(proc.pid)
                found += [c.pid for c in proc.children(recursive=True)]
        except psutil.Error:
            continue
    return found


def _cmdline(proc) -> list[str]:
    """A process's command line, empty for one that exited or is a zombie (Ray's short-lived
    helpers come and go while the test lists them)."""
    import psutil

    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child its parent has not reaped)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.slow
def test_a_killed_driver_leaves_no_ray_process(task_models, tmp_path):
    import psutil

    store = tmp_path / "run"
    config = _write_config(tmp_path / "c.yml", _config(task_models))
    argv = [a for a in _argv(config, store, "--max-fevals", "200") if a != "--no-ray"] + ["--num-workers", "2"]
    driver = subprocess.Popen([sys.executable, "-m", "evolve.cli", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (store / "evaluations.jsonl").exists():
            time.sleep(0.5)
        assert (store / "evaluations.jsonl").exists(), "the run never started"
        ours = [_cmdline(p) for p in psutil.Process(driver.pid).children(recursive=True)]
        session = next(part.split("session_")[1].split("/")[0] for cmdline in ours for part in cmdline
                       if "session_" in part)
        ray_pids = set(_session_processes(f"session_{session}")) | {p.pid for p in
                                                                     psutil.Process(driver.pid).children(recursive=True)}
        assert len(ray_pids) >= 3
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.monotonic() + 30
    alive = ray_pids
    while time.monotonic() < deadline:
        alive = {pid for pid in ray_pids if _running(pid)}
        if not alive:
            break
        time.sleep(0.5)
    assert not alive, f"left running: {[_cmdline(psutil.Process(p))[:2] for p in alive]}"
