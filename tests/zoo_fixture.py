"""Session fixture ``toy_zoo``: the toy model zoo (base + spatial/arith/format experts), built once.

Registered by ``pytest_plugins`` in tests/conftest.py. The zoo is built in a
session temp dir (about 2-5 minutes on 2 cores); set ``TOY_ZOO_DIR=<dir>`` to build into / reuse a
persistent folder instead (the build's stamp makes a matching zoo return at once).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from toy_zoo import Zoo, ZooSettings, build_zoo  # noqa: E402

ZOO_SEED = 0


@pytest.fixture(scope="session")
def toy_zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    """The default zoo (seed 0, default settings, with its accuracy matrix). Read-only."""
    env_dir = os.environ.get("TOY_ZOO_DIR")
    root = Path(env_dir) if env_dir else tmp_path_factory.mktemp("toy_zoo") / "zoo"
    return build_zoo(root, seed=ZOO_SEED, settings=ZooSettings(), log=lambda _msg: None)
