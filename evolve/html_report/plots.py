"""The report's figures, drawn with matplotlib into inline SVG strings (the numbers come from
:mod:`.series` and :mod:`.compare`).

matplotlib's object API only (a ``Figure`` and its SVG canvas, no ``pyplot``): no global figure
state, so a report can be drawn in a background thread of a running search.  Text stays text
(``svg.fonttype: none``: small, sharp, searchable); ids are prefixed per figure so that several
SVGs live in one page; the metadata block (which names matplotlib's web site) is dropped.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

from evolve.baselines import START_ROLES, start_label
from evolve.html_report.compare import HeatPanel, TaskPanel, TradeoffPanel
from evolve.html_report.labels import GAP, label_offsets, reference_dashes
from evolve.html_report.series import BatchStat, FitnessTrace, Timeline

__all__ = ["BEST_COLOR", "EQUAL_COLOR", "baseline_colors", "draw_references", "dynamics_svg", "fitness_svg",
           "genome_svg", "hide_unused", "new_figure", "panel_grid",
           "placeholder_svg", "styled", "task_svg", "timeline_svg", "to_svg", "tradeoff_svg"]

BEST_COLOR = "#1f5fbf"
EQUAL_COLOR = "#e67e22"
FAILED_COLOR = "#d62728"
HELD_COLOR = "#111111"
BASE_COLOR = "#7f7f7f"
PARENT_COLORS = ("#2ca02c", "#9467bd", "#8c564b", "#17becf", "#bcbd22", "#e377c2", "#393b79", "#637939")
KIND_COLORS = {"train": BEST_COLOR, "held_out": HELD_COLOR, "baseline": EQUAL_COLOR}
STYLE = {"svg.fonttype": "none", "font.size": 9, "axes.titlesize": 10, "axes.spines.top": False,
         "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25, "legend.fontsize": 8,
         "legend.frameon": False}


def baseline_colors(baselines: Sequence[dict[str, Any]]) -> dict[str, str]:
    """A colour per baseline name, the same in every figure: base grey, the equal merge orange,
    the other parents from a palette."""
    out, i = {}, 0
    for entry in baselines:
        if entry["role"] == "base":
            out[entry["name"]] = BASE_COLOR
        elif entry["role"] in START_ROLES:
            out[entry["name"]] = EQUAL_COLOR
        else:
            out[entry["name"]] = PARENT_COLORS[i % len(PARENT_COLORS)]
            i += 1
    return out


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _svg(fig: Any, name: str) -> str:
    """``fig`` as an inline ``<svg>`` element whose ids are prefixed with ``name``."""
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG

    FigureCanvasSVG(fig)
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": name}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    text = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", text, count=2)
    text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{name}-{m.group(1)}"', text)
    text = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{name}-{m.group(1)}"', text)
    text = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{name}-{m.group(1)})", text)
    return text.replace("<svg ", f'<svg role="img" aria-label="{name}" ', 1)


def _styled(draw: Any) -> Any:
    """Run a drawing function under the report's matplotlib style."""

    def wrapper(*args: Any, **kwargs: Any) -> str:
        import matplotlib

        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)

    wrapper.__doc__ = draw.__doc__
    wrapper.__name__ = draw.__name__
    return wrapper


def placeholder_svg(text: str, name: str = "empty") -> str:
    """A small SVG that says why a figure has nothing to show yet."""
    from html import escape

    return (f'<svg role="img" aria-label="{escape(name)}" class="placeholder" width="640" height="48" '
            f'viewBox="0 0 640 48"><text x="12" y="30" font-size="14" fill="#666">{escape(text)}</text></svg>')


@_styled
def fitness_svg(trace: FitnessTrace, baselines: Sequence[dict[str, Any]], colors: dict[str, str]) -> str:
    """Fitness of every evaluation, the best so far, held-out scores, baselines as lines."""
    fig = _figure(11, 4.2)
    ax = fig.add_subplot()
    ok = [p for p in trace.points if p.status == "ok" and not p.cached and not p.estimate]
    design = [p for p in ok if p.design]
    cached = [p for p in trace.points if p.status == "ok" and p.cached]
    estimates = [p for p in trace.points if p.status == "ok" and p.estimate and not p.cached]
    failed = [p for p in trace.points if p.status != "ok"]
    refs = [(e, e["fitness"]) for e in baselines if e["fitness"] is not None]
    values = [p.fitness for p in ok + cached + estimates] + [v for _, v, _ in trace.held_out] + [v for _, v in refs]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    pad = max(hi - lo, 0.05) * 0.08
    floor = lo - 2 * pad
    searched = [p for p in ok if not p.design]
    ax.scatter([p.n for p in searched], [p.fitness for p in searched], s=16, color=BEST_COLOR, alpha=0.65,
               label="evaluation", zorder=3)
    if design:
        ax.scatter([p.n for p in design], [p.fitness for p in design], s=24, marker="^", color=BEST_COLOR,
                   alpha=0.45, label="start design (space-filling)", zorder=3)
    if cached:
        ax.scatter([p.n for p in cached], [p.fitness for p in cached], s=16, facecolors="none",
                   edgecolors=BEST_COLOR, label="cache hit (same recipe)", zorder=3)
    if estimates:
        ax.scatter([p.n for p in estimates], [p.fitness for p in estimates], s=12, marker=".", color="#999999",
                   label="stopped early (estimate)", zorder=2)
    if failed:
        ax.scatter([p.n for p in failed], [floor] * len(failed), marker="x", s=28, color=FAILED_COLOR,
                   label=f"failed ({len(failed)}, penalty fitness)", zorder=3)
    if trace.best:
        xs, ys = zip(*trace.best)
        ax.step(xs, ys, where="post", color=BEST_COLOR, linewidth=2, label="best so far", zorder=4)
    if trace.held_out:
        ax.scatter([n for n, _, _ in trace.held_out], [v for _, v, _ in trace.held_out], marker="D", s=30,
                   color=HELD_COLOR, label="held-out score (incumbents)", zorder=5)
    # Lines within 1.5% of the axis of each other take turns along the line (one would hide the
    # other); the legend shows each line's own style.
    from matplotlib.lines import Line2D

    keys = []
    for (entry, value), dashes in zip(refs, reference_dashes([v for _, v in refs], 0.015 * (hi - floor + 2 * pad))):
        start = entry["role"] in START_ROLES
        what = start_label(entry["role"]) if start else f"parent {entry['name']}"
        color, style = colors.get(entry["name"], BASE_COLOR), ":" if start else "--"
        ax.axhline(value, color=color, linestyle=dashes or style, linewidth=1.3, zorder=1)
        keys.append(Line2D([], [], color=color, linestyle=style, linewidth=1.3, label=f"{what} {value:.4f}"))
    ax.set_ylim(floor - pad, hi + pad)
    ax.set_xlim(0.5, max(len(trace.points), 1) + 0.5)
    ax.set_xlabel("evaluation (in the order recorded)")
    ax.set_ylabel("train fitness")
    ax.legend(handles=ax.get_legend_handles_labels()[0] + keys, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _svg(fig, "fig-fitness")


@_styled
def task_svg(panels: Sequence[TaskPanel], colors: dict[str, str]) -> str:
    """Per-task scores: the best beside each baseline, one panel per task set."""
    import numpy as np

    most = max(len(p.tasks) * max(len(p.series), 1) for p in panels)
    fig = _figure(11, 1.2 + 0.18 * most + 0.25 * max(len(p.tasks) for p in panels))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        count = max(len(panel.series), 1)
        height = 0.8 / count
        ticks = np.arange(len(panel.tasks))
        top = 1.0
        for i, series in enumerate(panel.series):
            values = [np.nan if v is None else v for v in series.values]
            color = BEST_COLOR if series.role == "best" else colors.get(series.label, BASE_COLOR)
            offsets = ticks - 0.4 + height * (i + 0.5)
            ax.barh(offsets, values, height=height * 0.92, color=color, label=series.label)
            for y, v in zip(offsets, series.values):
                if v is not None:
                    ax.text(v, y, f" {v:.3f}", va="center", fontsize=7)
                    top = max(top, v)
        ax.set_yticks(ticks, panel.tasks)
        ax.invert_yaxis()
        ax.set_xlim(0, top * 1.15)
        ax.set_title(panel.title)
        ax.set_xlabel("score")
        ax.grid(axis="y", visible=False)
    axes[0].legend(loc="lower right", bbox_to_anchor=(1.0, 1.06), ncols=min(len(panels[0].series), 4))
    return _svg(fig, "fig-tasks")


@_styled
def genome_svg(panels: Sequence[HeatPanel]) -> str:
    """The best genome as heatmaps, layer group x model, one per gene and filter set."""
    rows, cols = len(panels[0].rows), len(panels[0].cols)
    per_row = min(len(panels), max(1, 3 if cols <= 4 else 2))
    lines = -(-len(panels) // per_row)
    fig = _figure(min(11.0, per_row * (1.9 + 0.95 * cols)), lines * (1.0 + 0.32 * rows))
    axes = fig.subplots(lines, per_row, squeeze=False).ravel()
    annotate = rows * cols <= 160
    for ax, panel in zip(axes, panels):
        diverging = panel.vmin < 0 < panel.vmax
        image = ax.pcolormesh(panel.values, cmap="RdBu_r" if diverging else "viridis", vmin=panel.vmin,
                              vmax=panel.vmax, edgecolors="white", linewidth=0.5)  # vector cells, no raster
        ax.set_ylim(rows, 0)
        ax.set_xticks([m + 0.5 for m in range(cols)], panel.cols, rotation=30 if cols > 4 else 0,
                      ha="right" if cols > 4 else "center")
        ax.set_yticks([g + 0.5 for g in range(rows)], panel.rows)
        ax.grid(False)
        ax.set_title(panel.title)
        if annotate:
            span = panel.vmax - panel.vmin or 1.0
            for g, row in enumerate(panel.values):
                for m, value in enumerate(row):
                    dark = (value - panel.vmin) / span < 0.6 if not diverging else abs(value) / max(abs(panel.vmin),
                                                                                                  panel.vmax) > 0.6
                    ax.text(m + 0.5, g + 0.5, f"{value:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")
        fig.colorbar(image, ax=ax, shrink=0.9)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return _svg(fig, "fig-genome")


def panel_grid(count: int) -> tuple[Any, Any]:
    """A figure of ``count`` task-pair panels, three per row, and its axes (flat; call
    :func:`hide_unused` once drawn)."""
    per_row = min(count, 3)
    lines = -(-count // per_row)
    fig = _figure(3.7 * per_row + 0.6, 3.3 * lines)
    return fig, fig.subplots(lines, per_row, squeeze=False).ravel()


def hide_unused(axes: Any, used: int) -> None:
    """Hide the panels of :func:`panel_grid` beyond the first ``used``."""
    for ax in axes[used:]:
        ax.set_visible(False)


def draw_references(ax: Any, references: Sequence[tuple[str, str, float, float]], colors: dict[str, str]) -> None:
    """The baselines of a task-pair panel, ``(name, role, x, y)`` each: parents as triangles, the
    start point as a square, each named; names that would print over each other (parents with
    close scores) are moved apart."""
    for label, role, x, y in references:
        marker = "s" if role in START_ROLES else "^"
        ax.scatter([x], [y], marker=marker, s=40, color=colors.get(label, BASE_COLOR), edgecolors="black",
                   linewidths=0.5, zorder=4)
    offsets = label_offsets([(x, y) for _, _, x, y in references], [r[0] for r in references], ax.get_xlim(),
                            ax.get_ylim())
    for (label, _, x, y), offset in zip(references, offsets):
        moved = offset != (GAP, GAP)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=offset, fontsize=7,
                    arrowprops={"arrowstyle": "-", "color": "#888888", "linewidth": 0.5} if moved else None)


@_styled
def tradeoff_svg(panels: Sequence[TradeoffPanel], colors: dict[str, str]) -> str:
    """Two tasks' scores over all candidates, the non-dominated ones highlighted; small
    multiples for every pair of tasks."""
    fig, axes = panel_grid(len(panels))
    for i, (ax, panel) in enumerate(zip(axes, panels)):
        rest = [(x, y) for x, y, f in zip(panel.xs, panel.ys, panel.front) if not f]
        front = sorted((x, y) for x, y, f in zip(panel.xs, panel.ys, panel.front) if f)
        if rest:
            ax.scatter(*zip(*rest), s=14, color="#9aa5b1", alpha=0.7, label="candidate")
        if front:
            ax.scatter(*zip(*front), s=26, color=BEST_COLOR, label="non-dominated", zorder=3)
            ax.plot(*zip(*front), color=BEST_COLOR, linewidth=1, alpha=0.6, drawstyle="steps-post")
        if panel.best is not None:
            ax.scatter([panel.best[0]], [panel.best[1]], marker="*", s=160, color="#ffd400", edgecolors="black",
                       linewidths=0.7, label="best (fitness)", zorder=5)
        draw_references(ax, panel.references, colors)
        ax.set_xlabel(panel.task_x)
        ax.set_ylabel(panel.task_y)
        if i == 0:
            ax.legend(loc="best")
    hide_unused(axes, len(panels))
    return _svg(fig, "fig-tradeoff")


@_styled
def dynamics_svg(stats: Sequence[BatchStat]) -> str:
    """Per tell batch: the population's spread (and drift from the start), and its fitness."""
    fig = _figure(11, 3.4)
    left, right = fig.subplots(1, 2)
    batches = [s.batch for s in stats]
    genes = list(stats[0].spread_by_gene) if stats else []
    dots = {"marker": "o", "markersize": 3} if len(stats) <= 60 else {}
    if len(genes) > 1:
        for gene in genes:
            left.plot(batches, [s.spread_by_gene[gene] for s in stats], label=f"spread: {gene}", **dots)
    else:
        left.plot(batches, [s.spread for s in stats], color=BEST_COLOR, label="spread (RMS std of the genes)", **dots)
    if any(s.drift is not None for s in stats):
        left.plot(batches, [s.drift for s in stats], linestyle="--", color="#555555",
                  label="mean's distance from the start (RMS)", **dots)
    left.set_xlabel("tell batch")
    left.set_ylabel("gene units")
    left.set_title("population spread")
    left.legend(loc="best")
    have = [s for s in stats if s.best is not None]
    if have:
        xs = [s.batch for s in have]
        right.fill_between(xs, [s.worst for s in have], [s.best for s in have], color=BEST_COLOR, alpha=0.15,
                           label="worst to best")
        right.plot(xs, [s.best for s in have], color=BEST_COLOR, label="best", **dots)
        right.plot(xs, [s.median for s in have], color="#555555", label="median", **dots)
        right.legend(loc="best")
    else:  # every candidate failed so far: say so instead of an empty legend
        right.text(0.5, 0.5, "no successful candidate yet", ha="center", va="center", transform=right.transAxes)
    right.set_xlabel("tell batch")
    right.set_ylabel("train fitness")
    right.set_title("fitness per batch (successful candidates)")
    for ax in (left, right):
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _svg(fig, "fig-dynamics")


@_styled
def timeline_svg(timeline: Timeline) -> str:
    """Which worker ran what, when: one row per worker, idle time blank, pauses cut."""
    rows = len(timeline.rows)
    fig = _figure(11, min(1.3 + 0.32 * rows, 12))
    ax = fig.add_subplot()
    minutes = timeline.length > 180
    scale = 60.0 if minutes else 1.0
    groups: dict[str, list[Any]] = {}  # one barh call per kind: thousands of jobs draw fast
    for bar in timeline.bars:
        groups.setdefault("failed" if bar.status != "ok" else bar.kind, []).append(bar)
    labels = {"baseline": "baseline", "train": "candidate", "held_out": "held-out re-score", "failed": "failed"}
    for kind, bars in sorted(groups.items(), key=lambda item: list(labels).index(item[0]) if item[0] in labels else 9):
        color = FAILED_COLOR if kind == "failed" else KIND_COLORS.get(kind, BEST_COLOR)
        ax.barh([b.row for b in bars], [(b.end - b.start) / scale for b in bars], left=[b.start / scale for b in bars],
                height=0.7, color=color, edgecolor="white", linewidth=0.4 if len(bars) < 400 else 0,
                label=labels.get(kind, kind))
    for x, real in timeline.breaks:
        ax.axvline(x / scale, color="#999999", linestyle=(0, (2, 2)), linewidth=1)
        hours, rest = divmod(int(real), 3600)
        text = f"paused {hours}h{rest // 60:02d}m" if hours else f"paused {rest // 60}m{rest % 60:02d}s"
        ax.text(x / scale, -0.45, text, rotation=90, va="top", ha="center", fontsize=7, color="#444444",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1})
    for row, busy in enumerate(timeline.busy):
        ax.text(1.005, row, f"busy {busy:.0%}", transform=ax.get_yaxis_transform(), va="center", fontsize=8)
    ax.set_yticks(range(rows), timeline.rows)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_xlim(0, timeline.length / scale * 1.01 if timeline.length else 1)
    ax.set_xlabel("minutes since the first job" if minutes else "seconds since the first job")
    ax.grid(axis="y", visible=False)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=4)
    return _svg(fig, "fig-timeline")


# For the figures drawn in other modules (evolve.html_report.pareto): the same figure, style and SVG.
new_figure, styled, to_svg = _figure, _styled, _svg
