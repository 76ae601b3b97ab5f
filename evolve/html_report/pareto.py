"""The report's Pareto sections, for a multi-objective run (``search.objectives: pareto``).

- ``pareto``: per pair of tasks, every successful candidate (infeasible ones, below a floor, as
  crosses), the run's front over *all* its objectives in blue (a member may look dominated on
  one pair: it wins on another task), the parents as triangles and the floors as dashed lines;
- ``hypervolume``: the front's hypervolume (over the floors, else 0) after each evaluation;
- a table of the front: per member its train and held-out scores and its recipe file.

Weighted runs get none of these (their trade-offs are in the ``tradeoff`` figure).
"""

from __future__ import annotations

from itertools import combinations
from typing import Any, Sequence

from evolve.html_report.compare import score_of

__all__ = ["pareto_figures", "pareto_tables"]

CAPTIONS = {
    "pareto": "The Pareto front over all the run's objectives (each task a score to maximize), drawn per pair of "
              "tasks: front members in blue (a member may look dominated on one pair: it is better on another "
              "task), other successful candidates grey, infeasible ones (below a floor) as red crosses, the "
              "parents and the equal merge as triangles and a square, the floors as dashed lines.",
    "hypervolume": "The hypervolume of the front found so far (the volume of the score space it dominates above "
                   "the reference point: each task's floor, else 0) after each evaluation, in ledger order.",
}


def _objectives(data: Any) -> Any:
    from evolve.search.objectives import Objectives

    config = data.config
    if config is None or config.search is None or config.search.objectives != "pareto":
        return None
    return Objectives(config)


def pareto_figures(data: Any, colors: dict[str, str]) -> list[Any]:
    """The Pareto figures of a multi-objective run (none for a weighted one)."""
    from evolve.html_report.page import Figure
    from evolve.html_report.plots import placeholder_svg
    from evolve.pareto_export import hypervolume_history

    objectives = _objectives(data)
    if objectives is None:
        return []
    front = objectives.front(data.records)
    history = hypervolume_history(objectives, data.records)
    front_svg = _front_svg(data, objectives, {r["eval_id"] for r in front}, colors) if front else \
        placeholder_svg("no feasible candidate scored in full yet", "fig-pareto")
    hv_svg = _hypervolume_svg(history) if history else placeholder_svg("nothing to show yet", "fig-hypervolume")
    return [Figure("pareto", "Pareto front", CAPTIONS["pareto"], front_svg),
            Figure("hypervolume", "Hypervolume over the run", CAPTIONS["hypervolume"], hv_svg)]


def pareto_tables(data: Any) -> list[tuple[str, str]]:
    """The front as a table (none for a weighted run)."""
    from evolve.html_report.page import table
    from evolve.pareto_export import front_summary

    objectives = _objectives(data)
    if objectives is None:
        return []
    summary = front_summary(objectives, data.records)
    rows = [(m["eval_id"], m["train_fitness"], m["held_out_fitness"],
             ", ".join(f"{k}={v:.3f}" for k, v in m["train_scores"].items()),
             ", ".join(f"{k}={v:.3f}" for k, v in (m["held_out_scores"] or {}).items()), f"pareto/{m['recipe']}")
            for m in summary["front"]]
    body = table(["candidate", "fitness", "held-out", "scores", "held-out scores", "recipe"], rows,
                 numeric=(1, 2), name="pareto")
    return [(f"Pareto front ({len(rows)} members, hypervolume {summary['hypervolume']:.4f})", body)]


def _front_svg(data: Any, objectives: Any, front_ids: set[str], colors: dict[str, str]) -> str:
    from evolve.html_report.plots import BEST_COLOR, draw_references, hide_unused, panel_grid, styled, to_svg

    tasks = objectives.tasks
    pairs = list(combinations(tasks, 2))[:6]
    ok = [r for r in data.records if r.get("kind") == "train" and r.get("status") == "ok"
          and r.get("cached_from") is None and not (r.get("race") or {}).get("stopped")]

    @styled
    def draw() -> str:
        fig, axes = panel_grid(len(pairs))
        for i, (ax, (a, b)) in enumerate(zip(axes, pairs)):
            groups: dict[str, list[tuple[float, float]]] = {"front": [], "feasible": [], "infeasible": []}
            for rec in ok:
                x, y = score_of(rec.get("scores"), a), score_of(rec.get("scores"), b)
                if x is None or y is None:
                    continue
                kind = "front" if rec["eval_id"] in front_ids else \
                    "feasible" if objectives.feasible(rec) else "infeasible"
                groups[kind].append((x, y))
            if groups["feasible"]:
                ax.scatter(*zip(*groups["feasible"]), s=14, color="#9aa5b1", alpha=0.7, label="candidate")
            if groups["infeasible"]:
                ax.scatter(*zip(*groups["infeasible"]), s=16, marker="x", color="#d62728", alpha=0.6,
                           label="infeasible")
            if groups["front"]:
                ax.scatter(*zip(*groups["front"]), s=28, color=BEST_COLOR, label="front", zorder=3)
            points = [(e["name"], e["role"], score_of(e["scores"], a), score_of(e["scores"], b))
                      for e in data.baselines]
            draw_references(ax, [p for p in points if p[2] is not None and p[3] is not None], colors)
            if a.min is not None:
                ax.axvline(a.min, color="#d62728", linestyle="--", linewidth=0.8)
            if b.min is not None:
                ax.axhline(b.min, color="#d62728", linestyle="--", linewidth=0.8)
            ax.set_xlabel(a.name)
            ax.set_ylabel(b.name)
            if i == 0:
                ax.legend(loc="best")
        hide_unused(axes, len(pairs))
        return to_svg(fig, "fig-pareto")

    return str(draw())


def _hypervolume_svg(history: Sequence[Sequence[float]]) -> str:
    from evolve.html_report.plots import BEST_COLOR, new_figure, styled, to_svg

    @styled
    def draw() -> str:
        fig = new_figure(7, 3)
        ax = fig.subplots()
        ax.plot([h[0] for h in history], [h[1] for h in history], color=BEST_COLOR, drawstyle="steps-post")
        ax.set_xlabel("evaluations")
        ax.set_ylabel("hypervolume")
        return to_svg(fig, "fig-hypervolume")

    return str(draw())
