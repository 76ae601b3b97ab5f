"""Session fixture ``toy_zoo``: the toy model zoo (base + spatial/arith/format experts), built once.

Registered by ``pytest_plugins`` in tests/conftest.py. The zoo is built in a
session temp dir (about 2-5 minutes on 2 cores); set ``TOY_ZOO_DIR=<dir>`` to build into / reuse a
persistent folder instead (the build's stamp makes a matching zoo return at once).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from toy_zoo import Zoo, ZooSettings, build_zoo, read_stamp  # noqa: E402
from zoo_isa import pinned_env  # noqa: E402

ZOO_SEED = 0


@pytest.fixture(scope="session")
def toy_zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    """The default zoo (seed 0, default settings, with its accuracy matrix). Read-only."""
    env_dir = os.environ.get("TOY_ZOO_DIR")
    root = Path(env_dir) if env_dir else tmp_path_factory.mktemp("toy_zoo") / "zoo"
    # Built by the script in its own process, whose torch uses the pinned vector kernels (this
    # process's torch has long picked its own): the same zoo as `python scripts/build_zoo.py`
    # on any x86-64 machine. Then loaded here (the stamp matches: returns at once).
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_zoo.py"), "--out", str(root), "--seed", str(ZOO_SEED)],
        capture_output=True, text=True, env={**os.environ, **pinned_env()},
    )
    assert proc.returncode == 0, f"building the toy zoo failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return build_zoo(root, seed=ZOO_SEED, settings=ZooSettings(), log=lambda _msg: None)


@pytest.fixture(scope="session")
def zoo_dir(request: pytest.FixtureRequest) -> Path:
    """A complete toy zoo's folder, for tests that only read its models.

    A zoo that TOY_ZOO_DIR names is reused as it is when complete, whichever venv built it: the
    zoo's stamp hashes library versions, and the vLLM venv pins others than the main venv
    (transformers <5.20); tests that compare backends on the same checkpoints do not test the
    zoo build (rebuilding a shared zoo from there would also clobber it).  Else ``toy_zoo``
    builds one (minutes).
    """
    env_dir = os.environ.get("TOY_ZOO_DIR")
    if env_dir and read_stamp(Path(env_dir)) is not None:
        return Path(env_dir)
    return request.getfixturevalue("toy_zoo").root
