"""The setup scripts: visible installs, and every declared dependency installed (the vLLM venv
installed the project with --no-deps and missed matplotlib)."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import missing_deps

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_every_declared_dependency_is_installed_here() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPTS / "missing_deps.py")], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_a_missing_dependency_is_named(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    declared = ["torch>=2.4", "matplotlib-not-here>=3.7", "optuna>=3.4; extra == \"optuna\"",
                "nowhere-pkg; python_version < \"3\""]
    monkeypatch.setattr(missing_deps.metadata, "requires", lambda dist: declared)
    assert missing_deps.missing() == ["matplotlib-not-here>=3.7"]  # extras and other Pythons are not asked
    assert missing_deps.main([]) == 1
    assert "matplotlib-not-here>=3.7" in capsys.readouterr().err
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("matplotlib-not-here")


@pytest.mark.parametrize("script", ["setup.sh", "setup_vllm.sh"])
def test_setup_installs_visibly_and_checks_the_dependencies(script: str) -> None:
    text = (SCRIPTS / script).read_text()
    installs = [line for line in text.splitlines() if re.search(r"(pip|PIP\[@\]}\") install ", line)]
    project = [line for line in installs if " -e " in line]
    assert project and not any("--no-deps" in line for line in project), project  # the project's deps come along
    assert not any(" -q" in line for line in installs if "shim" not in line), installs  # pip's progress shows
    assert "scripts/missing_deps.py merge-evolve" in text
