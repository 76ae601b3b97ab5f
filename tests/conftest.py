"""Shared fixtures: tiny Llama checkpoints built on the fly, an offline HF environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import make_tiny_llama, write_bpe_tokenizer  # noqa: E402

pytest_plugins = ["zoo_fixture"]  # the session-scoped toy_zoo fixture


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four tiny Llama checkpoints with the same shape: ``base``, ``a``, ``b``, ``c``.

    ``b`` is sharded (two safetensors files + index), so readers meet both layouts.
    Read-only: tests that write must use their own ``tmp_path``.
    """
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "base": make_tiny_llama(root / "base", seed=0),
        "a": make_tiny_llama(root / "a", seed=1),
        "b": make_tiny_llama(root / "b", seed=2, shards=2),
        "c": make_tiny_llama(root / "c", seed=3),
    }


REPO_ROOT = Path(__file__).resolve().parents[1]


def mergekit_python() -> str | None:
    """The python of the test-only mergekit 0.1.5 venv, or None when it is not installed.

    ``MERGEKIT_PYTHON`` overrides the default ``.venv-mergekit/bin/python`` of the checkout
    (``bash scripts/setup.sh --with-mergekit`` builds it).  With ``REQUIRE_MERGEKIT=1`` (CI) a
    missing oracle fails the tests that need it instead of skipping them.
    """
    candidate = os.environ.get("MERGEKIT_PYTHON") or str(REPO_ROOT / ".venv-mergekit/bin/python")
    if Path(candidate).exists():
        return candidate
    if os.environ.get("REQUIRE_MERGEKIT") == "1":
        raise RuntimeError(f"REQUIRE_MERGEKIT=1 but no mergekit python at {candidate}")
    return None


@pytest.fixture(scope="session")
def mergekit_py() -> str:
    """Path of the mergekit oracle's python; skips the test when mergekit is not installed."""
    python = mergekit_python()
    if python is None:
        pytest.skip("mergekit 0.1.5 oracle not installed (bash scripts/setup.sh --with-mergekit)")
    return python


TASK_VOCAB = 320


@pytest.fixture(scope="session")
def task_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``base``, ``e1``, ``e2``: tiny random Llamas whose byte-level BPE reads the toy tasks.

    Random weights score near chance, but every evaluation path runs for real.
    """
    import json

    corpus = []
    for path in sorted((REPO_ROOT / "eval_tasks" / "data").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            corpus.extend(str(v) for v in json.loads(line).values())
    root = tmp_path_factory.mktemp("task_models")
    out = {}
    for name, seed in (("base", 20), ("e1", 21), ("e2", 22)):
        path = make_tiny_llama(root / name, seed=seed, tokenizer=False, vocab_size=TASK_VOCAB)
        write_bpe_tokenizer(path, TASK_VOCAB, corpus)
        out[name] = path
    return out
