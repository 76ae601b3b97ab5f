"""Load a task's rows from a jsonl file next to the task YAMLs, whatever the working directory.

lm-eval hands ``dataset_kwargs: {data_files: ...}`` to ``datasets.load_dataset`` unchanged, so a
relative path there resolves against the *current directory*. The task YAMLs here instead name
``custom_dataset: !function local_data.load`` (lm-eval imports this module from the YAML's folder)
with ``dataset_kwargs: {data_file: <path relative to eval_tasks/data>}``.

Files under ``hub/`` (the real users' tasks, prepared by ``scripts/prepare_hub_tasks.py``) are
looked up first in ``$MERGE_EVOLVE_HUB_DATA`` when it is set, so prepared data can live outside
the checkout (shared storage of a cluster, a test's temp folder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets

DATA_DIR = Path(__file__).resolve().parent / "data"
HUB_DATA_ENV = "MERGE_EVOLVE_HUB_DATA"


def data_path(data_file: str) -> Path:
    """Where ``data_file`` is read from: ``$MERGE_EVOLVE_HUB_DATA`` for ``hub/`` files when set."""
    hub_dir = os.environ.get(HUB_DATA_ENV)
    if hub_dir and data_file.startswith("hub/"):
        return Path(hub_dir).expanduser() / data_file.removeprefix("hub/")
    return DATA_DIR / data_file


def load(data_file: str, split: str = "test", missing_hint: str = "", **_metadata) -> datasets.DatasetDict:
    """Rows of ``eval_tasks/data/<data_file>`` as a one-split DatasetDict (no cache, no network).

    lm-eval also passes the task's ``metadata`` (and CLI model args) as keywords: ignored.
    """
    path = data_path(data_file)
    if not path.is_file():
        hint = missing_hint or "regenerate it with `python scripts/build_zoo.py --tasks-only`"
        if data_file.startswith("hub/"):
            hint += f", or set ${HUB_DATA_ENV} to the folder holding it"
        raise FileNotFoundError(f"{path}: task data file missing; {hint}")
    with path.open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
