"""Session fixture ``toy_zoo``: the toy model zoo (base + spatial/arith/format experts), built once.

Registered by ``pytest_plugins`` in tests/conftest.py.  Where the zoo lives (:func:`zoo_root`):

- ``TOY_ZOO_DIR=<dir>``: built into / reused from that folder;
- else the checkout's ``zoo/``, the folder ``python scripts/build_zoo.py`` (the README's first
  command) builds: reused when its stamp matches this code and seed, built there when it does
  not exist yet, so the README's two commands build the zoo once in either order;
- else (``zoo/`` holds a zoo of other settings, e.g. another seed or library versions) a session
  temp folder, so that the tests never overwrite a zoo the user built.

A build takes minutes: its progress lines (step, loss, ETA) are shown on the terminal even
though pytest captures output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from contextlib import nullcontext
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from toy_zoo import Zoo, ZooSettings, build_zoo, read_stamp  # noqa: E402
from toy_zoo.settings import stamp_for  # noqa: E402
from zoo_isa import pinned_env  # noqa: E402

ZOO_SEED = 0
CHECKOUT_ZOO = REPO / "zoo"


def zoo_root(env_dir: str | None, checkout_zoo: Path, key: str) -> Path | None:
    """The folder the session's zoo is built into or reused from (see the module docstring);
    None: a session temp folder."""
    if env_dir:
        return Path(env_dir)
    stamp = read_stamp(checkout_zoo)
    if stamp is not None and stamp.get("key") == key:
        return checkout_zoo
    if not checkout_zoo.exists():
        return checkout_zoo
    return None


def _build(root: Path, request: pytest.FixtureRequest) -> None:
    """``scripts/build_zoo.py --out root`` in its own process, its lines streamed to the terminal.

    Its own process: its torch uses the pinned vector kernels (this process's torch has long
    picked its own), so the zoo is the one ``python scripts/build_zoo.py`` builds on any x86-64
    machine.
    """
    cmd = [sys.executable, str(REPO / "scripts" / "build_zoo.py"), "--out", str(root), "--seed", str(ZOO_SEED)]
    capture = request.config.pluginmanager.getplugin("capturemanager")
    tail: deque[str] = deque(maxlen=80)
    with capture.global_and_fixture_disabled() if capture is not None else nullcontext():
        print(f"\ntoy zoo: building {root} for the tests (once; set TOY_ZOO_DIR to reuse another)", flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **pinned_env()})
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line)
            print(f"toy zoo: {line}", end="", flush=True)
        code = proc.wait()
    assert code == 0, "building the toy zoo failed:\n" + "".join(tail)


@pytest.fixture(scope="session")
def toy_zoo(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Zoo:
    """The default zoo (seed 0, default settings, with its accuracy matrix). Read-only."""
    key = stamp_for(ZOO_SEED, ZooSettings())["key"]
    root = zoo_root(os.environ.get("TOY_ZOO_DIR"), CHECKOUT_ZOO, key)
    if root is None:
        root = tmp_path_factory.mktemp("toy_zoo") / "zoo"
    if (read_stamp(root) or {}).get("key") != key:
        _build(root, request)
    return build_zoo(root, seed=ZOO_SEED, settings=ZooSettings(), log=lambda _msg: None)  # the stamp matches


@pytest.fixture(scope="session")
def zoo_dir(request: pytest.FixtureRequest) -> Path:
    """A complete toy zoo's folder, for tests that only read its models.

    A complete zoo that TOY_ZOO_DIR names (else the checkout's ``zoo/``) is reused as it is,
    whichever venv built it: the zoo's stamp hashes library versions, and the vLLM venv pins
    others than the main venv (transformers <5.20); tests that compare backends on the same
    checkpoints do not test the zoo build (rebuilding a shared zoo from there would also
    clobber it).  Else ``toy_zoo`` builds one (minutes).
    """
    env_dir = os.environ.get("TOY_ZOO_DIR")
    folder = Path(env_dir) if env_dir else CHECKOUT_ZOO
    if read_stamp(folder) is not None:
        return folder
    return request.getfixturevalue("toy_zoo").root
