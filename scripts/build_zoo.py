#!/usr/bin/env python
"""Build the toy model zoo (offline, 2 CPU cores, a few minutes) and print its accuracy matrix.

    python scripts/build_zoo.py [--out zoo] [--seed 0] [--force]
    python scripts/build_zoo.py --tasks-only      # regenerate eval_tasks/data/toy_*.jsonl

Writes ``<out>/{base,spatial,arith,format}`` (Hugging Face model directories) and
``<out>/matrix.json``. A second call with the same seed and settings returns at once (stamp
``<out>/zoo_stamp.json``); ``--force`` rebuilds. Exit status 2 when the matrix misses the bar.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_isa import pin_vector_isa  # noqa: E402  (torch-free; must run before torch loads)

pin_vector_isa()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval rebuilds its request lists (with bars) per score


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="zoo", help="output directory (default: zoo)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    parser.add_argument("--tasks-only", action="store_true",
                        help="only regenerate the toy task data in eval_tasks/data and exit")
    parser.add_argument("--no-eval", action="store_true", help="skip the accuracy matrix")
    parser.add_argument("--no-grid", action="store_true", help="skip the merge-weight grid")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--progress-every", type=float, default=5.0, metavar="SECONDS",
                        help="seconds between progress lines (step, loss, ETA) while training (default: 5)")
    args = parser.parse_args(argv)

    from toy_zoo import ZooSettings, build_zoo, format_matrix, read_stamp, write_task_data
    from toy_zoo.settings import stamp_for
    from toy_zoo.tasks import SKILLS
    from zoo_progress import BuildProgress

    if args.tasks_only:
        for path in write_task_data():
            print(f"wrote {path}")
        return 0
    settings = ZooSettings(threads=args.threads)
    if args.no_eval:
        settings = replace(settings, evaluate=False)
    if args.no_grid:
        settings = replace(settings, grid=())
    t0 = time.perf_counter()
    phases = [("base", settings.base_steps)] + [(s, settings.expert_plan(s)[0]) for s in SKILLS]
    fresh = args.force or (read_stamp(Path(args.out)) or {}).get("key") != stamp_for(args.seed, settings)["key"]
    if fresh:
        plan = ", ".join(f"{name} ({steps} steps)" for name, steps in phases)
        what = ", then the accuracy matrix" if settings.evaluate else ""
        print(f"building the toy zoo at {Path(args.out).resolve()} (seed {args.seed}): tokenizer, {plan}{what}; "
              f"a few minutes on 2 idle cores, a line every {args.progress_every:g} s", flush=True)
    with BuildProgress(phases, every=args.progress_every) as progress:
        zoo = build_zoo(args.out, seed=args.seed, settings=settings, force=args.force, log=progress.log)
    how = "up to date (cached)" if zoo.cached else "built"
    print(f"zoo {how} at {zoo.root} in {time.perf_counter() - t0:.1f} s: " + ", ".join(zoo.models))
    if zoo.matrix is None:
        return 0
    print(format_matrix(zoo.matrix))
    return 2 if zoo.matrix["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
