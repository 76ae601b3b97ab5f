"""scripts/gpu_check.sh on a machine without a GPU: every CUDA check is a clean SKIP, the
``--self-test`` mode runs the same comparisons with the CPU standing in for the GPU, and any
FAIL (or a crashed check) makes the script exit non-zero."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _run(*args: str, python: str = sys.executable, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": python, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=REPO)


def _results(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")]


def test_without_a_gpu_every_check_skips_cleanly() -> None:
    proc = _run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = _results(proc.stdout)
    assert [line.split(":")[0] for line in lines] == [
        "SKIP cuda", "SKIP merge cuda == cpu", "SKIP hf evaluator cuda == cpu", "SKIP vllm evaluator == hf evaluator",
        "SKIP bench_vllm"]
    assert all("no CUDA device" in line for line in lines)
    assert proc.stdout.strip().splitlines()[-1] == "gpu_check: 0 passed, 0 failed, 5 skipped"


@pytest.mark.slow
def test_self_test_runs_every_comparison_on_the_cpu() -> None:
    proc = _run("--self-test")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = _results(proc.stdout)
    merges = [line for line in lines if line.startswith("PASS merge ")]
    methods = {line.split()[2] for line in merges}
    assert methods >= {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                       "breadcrumbs_ties", "della", "della_linear", "sce", "sce_topk", "model_stock", "slerp", "nuslerp",
                       "multislerp", "karcher", "nearswap", "arcee_fusion", "ram", "ramplus_tl"}
    assert len(merges) == 3 * len(methods)  # merge-yaml on the "GPU", in memory resident and streamed
    if "lm_eval yes" in proc.stdout:
        assert sum(line.startswith("PASS hf evaluator") for line in lines) == 2
    assert not any(line.startswith("FAIL") for line in lines)


def test_a_failed_or_crashed_check_fails_the_script(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\n"
                    'case "$2" in\n'
                    '  merge) echo "FAIL merge ties: 3 elements beyond 1 ulp"; exit 1 ;;\n'
                    '  hf) echo "boom" >&2; exit 3 ;;\n'
                    '  *) echo "PASS $2: fine" ;;\n'
                    "esac\n")
    fake.chmod(0o755)
    proc = _run(python=str(fake))
    assert proc.returncode == 1
    assert "FAIL merge ties: 3 elements beyond 1 ulp" in proc.stdout
    assert "FAIL hf: exit 3; last lines of its stderr:" in proc.stdout and "boom" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "gpu_check: 3 passed, 2 failed, 0 skipped -- FAILED"
