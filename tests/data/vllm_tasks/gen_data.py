"""Rows of a toy task's jsonl in ``eval_tasks/data/`` for the test-only tasks in this folder.

lm-eval imports this module from the YAML's folder (``custom_dataset: !function gen_data.load``);
the data is the toy tasks' own, read in place (nothing is copied or regenerated).
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

DATA_DIR = Path(__file__).resolve().parents[3] / "eval_tasks" / "data"


def load(data_file: str, split: str = "test", **_metadata) -> datasets.DatasetDict:
    """``eval_tasks/data/<data_file>`` as a one-split DatasetDict (no cache, no network)."""
    with (DATA_DIR / data_file).open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
