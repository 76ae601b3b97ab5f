#!/usr/bin/env python
"""Build the data of the real users' tasks (``spartqa_train``, ``alpaca_prompt_format``) from the hub.

Needs network access to the Hugging Face hub (it cannot run on our offline machines; it stops
with a one-line message there). It reproduces the rows of the mergekit-evolve tutorial exactly:

- ``spartqa_train``: ``load_dataset("metaeval/spartqa-mchoice")["train"].shuffle(seed=9163)
  .select(range(1000))``;
- ``alpaca_prompt_format``: the rows of ``vicgalle/alpaca-gpt4`` (train) whose ``input`` is empty,
  ``.sample(n=500, replace=False, random_state=749)`` with pandas, in sampled order.

and writes them as ``eval_tasks/data/hub/spartqa_train.jsonl`` and ``.../alpaca_gpt4_500.jsonl``,
the files ``eval_tasks/spartqa_train.yaml`` and ``eval_tasks/alpaca_prompt_format.yaml`` read
(from any working directory). With ``--out DIR`` elsewhere, point the tasks at it with
``export MERGE_EVOLVE_HUB_DATA=DIR``. Usage::

    python scripts/prepare_hub_tasks.py [--out eval_tasks/data/hub]
    lm_eval --model hf --model_args pretrained=<model> --tasks spartqa_train --include_path eval_tasks
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HUB_DIR = Path(__file__).resolve().parents[1] / "eval_tasks" / "data" / "hub"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def spartqa_rows() -> list[dict]:
    """1000 spartqa-mchoice train rows, shuffled with seed 9163 (the tutorial's recipe)."""
    from datasets import load_dataset

    return load_dataset("metaeval/spartqa-mchoice")["train"].shuffle(seed=9163).select(range(1000)).to_list()


def alpaca_rows() -> list[dict]:
    """500 alpaca-gpt4 rows with empty ``input``, pandas-sampled with random_state=749."""
    from datasets import load_dataset

    frame = load_dataset("vicgalle/alpaca-gpt4")["train"].to_pandas()
    frame = frame[frame["input"] == ""]
    return frame.sample(n=500, replace=False, random_state=749).to_dict(orient="records")


def _write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description="Build spartqa_train / alpaca_prompt_format data from the hub.")
    parser.add_argument("--out", type=Path, default=HUB_DIR, help=f"output folder (default: {HUB_DIR})")
    args = parser.parse_args(argv)
    offline = [v for v in OFFLINE_VARS if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]
    if offline:
        print(f"prepare_hub_tasks: {'/'.join(offline)} is set: this script downloads from the "
              "Hugging Face hub and cannot run offline", file=sys.stderr)
        return 1
    try:
        for name, rows_fn in (("spartqa_train.jsonl", spartqa_rows), ("alpaca_gpt4_500.jsonl", alpaca_rows)):
            rows = rows_fn()
            _write_jsonl(rows, args.out / name)
            print(f"wrote {len(rows)} rows to {args.out / name}")
    except Exception as exc:  # network/hub errors come in many types; report one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"prepare_hub_tasks: cannot fetch from the Hugging Face hub (offline?): {first}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
