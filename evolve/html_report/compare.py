"""The numbers behind the report's comparison figures (no plotting here).

- :func:`task_comparison`: per task, the best candidate's score beside each baseline's (train
  and held-out).
- :func:`genome_panels`: the best genome as matrices layer group x model, one per gene and filter.
- :func:`pareto_mask` and :func:`tradeoff_pairs`: two tasks' scores over all candidates, with the
  non-dominated candidates of each pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations, groupby
from typing import Any

from evolve.baselines import short_name
from evolve.protocols import TRAIN
from evolve.racing import stopped_early

__all__ = [
    "HeatPanel",
    "Series",
    "TaskPanel",
    "TradeoffPanel",
    "genome_panels",
    "pareto_mask",
    "score_of",
    "task_comparison",
    "tradeoff_pairs",
]


def score_of(scores: dict[str, Any] | None, task: Any) -> float | None:
    """A task's metric value in a ledger record's ``scores`` (None when absent or not a number)."""
    from evolve.search.fitness import is_finite_number, task_score

    value = task_score(scores or {}, task)
    return float(value) if is_finite_number(value) else None


@dataclass(frozen=True)
class Series:
    """One bar series: a label, its role (``best``, ``base``, ``model``, ``equal_merge``), a value
    per task (None: not scored)."""

    label: str
    role: str
    values: tuple[float | None, ...]


@dataclass(frozen=True)
class TaskPanel:
    """One task set's comparison: its title, task names and series."""

    title: str
    tasks: tuple[str, ...]
    series: tuple[Series, ...]


def task_comparison(best: dict[str, Any] | None, best_held: dict[str, Any] | None, baselines: Sequence[dict[str, Any]],
                    tasks: Sequence[Any], held_tasks: Sequence[Any]) -> list[TaskPanel]:
    """The train panel and (when there are held-out tasks) the held-out panel: the best's
    scores, then each baseline's (``baselines``: :func:`evolve.baselines.baseline_summary`)."""
    panels = []
    for title, task_list, record, key in (("train tasks", tasks, best, "scores"),
                                          ("held-out tasks", held_tasks, best_held, "held_out_scores")):
        if not task_list:
            continue
        series = []
        if record is not None:
            label = f"best ({best['eval_id']})" if best is not None else "best"
            series.append(Series(label, "best", tuple(score_of(record.get("scores"), t) for t in task_list)))
        for entry in baselines:
            values = tuple(score_of(entry[key], t) for t in task_list)
            if any(v is not None for v in values):
                series.append(Series(entry["name"], entry["role"], values))
        panels.append(TaskPanel(title, tuple(t.name for t in task_list), tuple(series)))
    return panels


@dataclass(frozen=True)
class HeatPanel:
    """One matrix of the best genome: ``values[g][m]`` for layer group g and model m."""

    title: str
    gene: str
    filter: str | None
    rows: tuple[str, ...]
    cols: tuple[str, ...]
    values: tuple[tuple[float, ...], ...]
    vmin: float
    vmax: float


def genome_panels(genome: Any, x: Sequence[float]) -> list[HeatPanel]:
    """The genome vector ``x`` as the recipe uses it (weights as decoded: ``|w|`` unless negative
    weights are allowed, densities clipped into their box; slerp: the raw t-scores), one panel
    per gene and filter set (``genome``: :class:`evolve.genome.Genome`)."""
    import numpy as np

    if genome.method == "passthrough":
        return [_stack_panel(genome, x)]
    if genome.method == "slerp":
        values = np.asarray(x, dtype=float).reshape(genome.shape)
    else:
        values = np.asarray(genome.encode(genome.decode(x)), dtype=float).reshape(genome.shape)
    lows, highs = genome.bounds
    rows = tuple(f"layers {a}-{b - 1}" if b - a > 1 else f"layer {a}" for a, b in genome.layer_ranges)
    cols = (tuple(short_name(m) for m in genome.definition.models) if genome.search.per_model
            else tuple(genome.columns))  # global genes: one column for the whole recipe
    panels = []
    for p, gene in enumerate(genome.genes):
        label = f"log10 {gene}" if genome.specs[p].log10 else gene  # the value as searched
        for f, pattern in enumerate(genome.filters):
            title = label if len(genome.filters) == 1 else f"{label}, {'tensors matching ' + repr(pattern) if pattern else 'other tensors'}"
            matrix = tuple(tuple(float(v) for v in values[g, :, f, p]) for g in range(genome.shape[0]))
            panels.append(HeatPanel(title, gene, pattern, rows, cols, matrix, float(lows[p]), float(highs[p])))
    return panels


def _stack_panel(genome: Any, x: Sequence[float]) -> HeatPanel:
    """A layer-stacking genome as one matrix: output layer (rows) x source (columns), the cell
    holding the source layer it runs (1-based; 0: another source's)."""
    layers = genome.layers(x)
    rows = tuple(f"layer {k}" for k in range(len(layers)))
    cols = tuple(short_name(m) for m in genome.sources)
    matrix = tuple(tuple(float(layer + 1) if s == source else 0.0 for s in range(len(cols)))
                   for source, layer in layers)
    return HeatPanel("source layer (1-based) per output layer", "layer", None, rows, cols, matrix, 0.0,
                     float(genome.source_layers))


def pareto_mask(xs: Sequence[float], ys: Sequence[float]) -> list[bool]:
    """Which points are non-dominated when both coordinates are maximised (a point is dominated
    when another is at least as good in both and better in one; equal points are both kept)."""
    mask = [False] * len(xs)
    above = float("-inf")  # the highest y among points with a larger x
    for _, group in groupby(sorted(range(len(xs)), key=lambda i: -xs[i]), key=lambda i: xs[i]):
        members = list(group)
        top = max(ys[i] for i in members)
        for i in members:
            mask[i] = ys[i] == top and top > above
        above = max(above, top)
    return mask


@dataclass
class TradeoffPanel:
    """Two tasks' scores over the successful candidates (``ids``, ``xs``, ``ys``, ``front``: the
    non-dominated ones of this pair), the best's point and the baselines' points."""

    task_x: str
    task_y: str
    ids: list[str] = field(default_factory=list)
    xs: list[float] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)
    front: list[bool] = field(default_factory=list)
    best: tuple[float, float] | None = None
    references: list[tuple[str, str, float, float]] = field(default_factory=list)  # (label, role, x, y)


def tradeoff_pairs(records: Sequence[dict[str, Any]], tasks: Sequence[Any], baselines: Sequence[dict[str, Any]],
                   best_id: str | None, max_pairs: int = 6) -> list[TradeoffPanel]:
    """One panel per pair of train tasks (the heaviest tasks' pairs first, at most ``max_pairs``)
    over the successful, fully scored train candidates (cache hits once)."""
    ranked = sorted(tasks, key=lambda t: -abs(float(t.weight)))
    pairs = list(combinations(ranked, 2))[:max_pairs]
    ok = [r for r in records if r.get("kind") == TRAIN and r.get("status") == "ok" and r.get("cached_from") is None
          and not stopped_early(r)]
    panels = []
    for a, b in pairs:
        panel = TradeoffPanel(a.name, b.name)
        for rec in ok:
            xa, yb = score_of(rec.get("scores"), a), score_of(rec.get("scores"), b)
            if xa is None or yb is None:
                continue
            panel.ids.append(rec["eval_id"])
            panel.xs.append(xa)
            panel.ys.append(yb)
            if rec["eval_id"] == best_id:
                panel.best = (xa, yb)
        panel.front = pareto_mask(panel.xs, panel.ys)
        for entry in baselines:
            xa, yb = score_of(entry["scores"], a), score_of(entry["scores"], b)
            if xa is not None and yb is not None:
                panel.references.append((entry["name"], entry["role"], xa, yb))
        panels.append(panel)
    return panels
