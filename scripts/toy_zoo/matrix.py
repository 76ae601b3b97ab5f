"""The zoo's accuracy matrix (models x toy tasks), the merge rows, and the bar it must pass.

Bar (issue #3): each expert beats the base by >= 0.25 on its own task and by at most 0.10 on
the others; the equal-weights (1/3) task-arithmetic merge is clearly (>= 0.10) below the best
expert on some task; and some non-trivial task-arithmetic merge (best point of a small grid over
per-expert weights) beats every parent and the equal-weights merge by >= 0.10 on the mean search
accuracy (the objective the evolutionary search will optimise).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from .evaluate import Scorer
from .merge import TaskArithmetic
from .tasks import EVAL_TASKS_DIR, SKILLS, task_name

OWN_MARGIN, OTHER_SLACK, MERGE_GAIN, EQUAL_GAP = 0.25, 0.10, 0.10, 0.10
EQUAL = "merge_ta_third"
SearchRows = dict[str, dict[str, float]]


def search_tasks() -> list[str]:
    """Search-split task names, in skill order."""
    return [task_name(s, "search") for s in SKILLS]


def heldout_tasks() -> list[str]:
    """Held-out task names, in skill order."""
    return [task_name(s, "heldout") for s in SKILLS]


def objective(row: Mapping[str, float], split: str = "search") -> float:
    """Equal-weight mean accuracy over the three skills of one split."""
    names = search_tasks() if split == "search" else heldout_tasks()
    return sum(row[t] for t in names) / len(names)


def evaluate_zoo(model: torch.nn.Module, tokenizer, state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
                 paths: Mapping[str, Path], grid: Sequence[float], grid_limit: int | None, batch_size: int,
                 log: Callable[[str], None] = print) -> dict:
    """Score the models, the equal-weights merge and a weight grid; returns the matrix dict.

    ``state_dicts`` and ``paths`` hold the same models (in memory, and saved); merges are made by
    merge_core from the saved directories."""
    experts = list(SKILLS)
    base = state_dicts["base"]
    merge = TaskArithmetic(paths["base"], [paths[e] for e in experts])
    every = Scorer(model, tokenizer, search_tasks() + heldout_tasks(), EVAL_TASKS_DIR, batch_size)
    rows: SearchRows = {name: every.score(sd) for name, sd in state_dicts.items()}
    merges = {EQUAL: [1 / 3] * 3}
    for name, weights in merges.items():
        rows[name] = every.score(merge(weights))
    points = []
    if grid:
        search = Scorer(model, tokenizer, search_tasks(), EVAL_TASKS_DIR, batch_size)
        for weights in itertools.product(grid, repeat=len(experts)):
            if not any(weights):
                continue
            sd = merge(weights)
            points.append({"weights": list(weights), "objective": objective(search.score(sd, limit=grid_limit))})
        best = max(points, key=lambda p: p["objective"])  # first maximum: grid order is fixed
        rows["merge_grid_best"] = every.score(merge(best["weights"]))
        merges["merge_grid_best"] = best["weights"]
        log(f"grid: {len(points)} points on {grid_limit or 'all'} docs/task; best weights "
            f"{dict(zip(experts, best['weights']))}")
    every.model.load_state_dict(base)
    matrix = {
        "experts": experts,
        "tasks": {"search": search_tasks(), "heldout": heldout_tasks()},
        "rows": rows,
        "merge_weights": {k: dict(zip(experts, v)) for k, v in merges.items()},
        "objective": {k: {"search": objective(r), "heldout": objective(r, "heldout")} for k, r in rows.items()},
        "grid": {"values": list(grid), "limit": grid_limit, "points": points},
    }
    matrix["failures"] = check_matrix(matrix)
    return matrix


def check_matrix(matrix: Mapping) -> list[str]:
    """Every way the matrix misses the bar (empty when it passes), one line each."""
    rows, experts = matrix["rows"], matrix["experts"]
    fails = []
    for split in ("search", "heldout"):
        names = matrix["tasks"][split]
        for expert, own in zip(experts, names):
            for task in names:
                gain = rows[expert][task] - rows["base"][task]
                if task == own and gain < OWN_MARGIN:
                    fails.append(f"{expert} beats base on its own {task} by only {gain:+.3f} (< {OWN_MARGIN})")
                if task != own and gain > OTHER_SLACK:
                    fails.append(f"{expert} beats base on {task} by {gain:+.3f} (> {OTHER_SLACK})")
    search = matrix["tasks"]["search"]
    gaps = {t: max(rows[e][t] for e in experts) - rows[EQUAL][t] for t in search}
    if max(gaps.values()) < EQUAL_GAP:
        fails.append(f"equal-weights merge is within {EQUAL_GAP} of the best expert on every task: {gaps}")
    if "merge_grid_best" in rows:
        rivals = max(matrix["objective"][k]["search"] for k in [*experts, EQUAL])
        best = matrix["objective"]["merge_grid_best"]["search"]
        if best < rivals + MERGE_GAIN:
            fails.append(f"best grid merge objective {best:.3f} < parents/equal merge {rivals:.3f} + {MERGE_GAIN}")
    return fails


def format_matrix(matrix: Mapping) -> str:
    """A plain-text table: one row per model/merge, search and held-out columns, objectives."""
    short = {t: t.replace("toy_", "").replace("_heldout", "/h").replace("prompt_format", "format")
             for split in ("search", "heldout") for t in matrix["tasks"][split]}
    cols = matrix["tasks"]["search"] + matrix["tasks"]["heldout"]
    head = f"{'model':<16}" + "".join(f"{short[c]:>10}" for c in cols) + f"{'obj':>8}{'obj/h':>8}"
    lines = [head, "-" * len(head)]
    for name, row in matrix["rows"].items():
        obj = matrix["objective"][name]
        lines.append(f"{name:<16}" + "".join(f"{row[c]:>10.3f}" for c in cols)
                     + f"{obj['search']:>8.3f}{obj['heldout']:>8.3f}")
    for name, weights in matrix["merge_weights"].items():
        lines.append(f"  {name}: weights " + ", ".join(f"{k}={v:g}" for k, v in weights.items()))
    lines.append("bar: PASS" if not matrix["failures"] else "bar: FAIL\n  " + "\n  ".join(matrix["failures"]))
    return "\n".join(lines)
