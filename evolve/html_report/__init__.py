"""``merge-evolve report --html``: one self-contained HTML page about a run (done or going).

The page opens offline anywhere (inline CSS and SVG; no script, no external URL) and shows the
headline numbers (best fitness, the best parent's, the gain), then the figures of
:data:`~evolve.html_report.page.FIGURES`, then tables (baselines, top candidates, failures,
provenance) and the best recipe and config as text.  The layers:

- :mod:`.run_data`: the run directory, read-only (a going run's ledger is read as it is);
- :mod:`.series`, :mod:`.compare`: the numbers each figure is drawn from (unit-tested);
- :mod:`.plots`: matplotlib, to SVG; :mod:`.page`: the HTML.

Imports matplotlib when a report is built, never before (``merge-evolve --help`` stays light).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evolve.html_report.run_data import RunData, load_run, run_is_live

__all__ = ["REPORT_FILE", "RunData", "build_report", "load_run", "run_is_live", "write_html_report"]

REPORT_FILE = "report.html"

CAPTIONS = {
    "fitness": "Every train evaluation in the order recorded (failed ones as red crosses at the bottom; triangles: "
               "the start design's whole-model merges, scored before CMA-ES starts from their best), the best so "
               "far, the held-out scores of the incumbents, and each parent's and the equal merge's train fitness "
               "as reference lines (with layer stacking, the start stack in the equal merge's place).",
    "tasks": "Each task's score of the best candidate beside each input model (the parents) and the equal-weights "
             "merge, on the search documents and on the held-out ones.",
    "genome": "The best recipe's genes per layer group (rows) and model (columns), as merged (weights and, for "
              "sparsifying methods, densities); one panel per tensor filter.",
    "tradeoff": "Two tasks' scores over every successful candidate; the non-dominated ones (no other candidate is "
                "as good on both and better on one) in blue, the best by fitness as a star, the baselines as "
                "triangles (the equal merge as a square). One panel per pair of tasks.",
    "dynamics": "Per tell batch: how spread out the candidates' genes are (RMS of the per-gene standard deviation) "
                "and how far the batch's mean moved from the starting point; and the batch's fitness.",
    "timeline": "Which worker ran what and when: candidates, held-out re-scorings, baselines and failures; blank "
                "space is idle time, long pauses (a run stopped and resumed) are cut and marked.",
}


def _figures(data: RunData, gains: dict[str, Any]) -> list[Any]:
    """Every figure of :data:`~evolve.html_report.page.FIGURES`, drawn (a placeholder when the
    run has nothing to show for one yet)."""
    from evolve.html_report import compare, plots, series
    from evolve.html_report.page import FIGURES, Figure
    from evolve.html_report.pareto import pareto_figures

    config, genome, baselines, best = data.config, data.genome, data.baselines, data.best
    colors = plots.baseline_colors(baselines)
    svgs: dict[str, str] = {}
    trace = series.fitness_trace(data.records, design=int(data.manifest.get("initial_design") or 0))
    if trace.points or any(e["fitness"] is not None for e in baselines):
        svgs["fitness"] = plots.fitness_svg(trace, baselines, colors)
    if config is not None:
        panels = compare.task_comparison(best, data.best_held_out, baselines, config.tasks, config.held_out)
        if any(p.series for p in panels):
            svgs["tasks"] = plots.task_svg([p for p in panels if p.series], colors)
        if len(config.tasks) >= 2:
            pairs = compare.tradeoff_pairs(data.records, config.tasks, baselines, best and best["eval_id"])
            if any(p.xs for p in pairs):
                svgs["tradeoff"] = plots.tradeoff_svg(pairs, colors)
    if genome is not None and best is not None:
        svgs["genome"] = plots.genome_svg(compare.genome_panels(genome, best["x"]))
    x0 = None
    if genome is not None and config is not None:
        import numpy as np

        x0 = genome.initial_point(config.random_init, np.random.default_rng(int(data.manifest.get("seed", 0))))
    # One kind per position, from the genes' names (``g0/spatial/weight`` -> ``weight``;
    # stacking's ``slot3/use``, ``slot3/layer``, ``slot3/<source>``).
    kinds = [name.rsplit("/", 1)[-1] for name in genome.gene_names()] if genome is not None else ["gene"]
    stats = series.batch_spread(data.records, kinds, x0)
    if stats:
        svgs["dynamics"] = plots.dynamics_svg(stats)
    timeline = series.worker_timeline(data.records)
    if timeline.bars:
        svgs["timeline"] = plots.timeline_svg(timeline)
    empty = {"tradeoff": "a trade-off needs two or more train tasks"} if config is not None and len(config.tasks) < 2 \
        else {}
    return [Figure(name, title, CAPTIONS[name],
                   svgs.get(name) or plots.placeholder_svg(empty.get(name, "nothing to show yet"), f"fig-{name}"))
            for name, title in FIGURES] + pareto_figures(data, colors)  # a multi-objective run's front


def _tables(data: RunData, gains: dict[str, Any]) -> list[tuple[str, str]]:
    from evolve.html_report.page import failures_html, table
    from evolve.html_report.pareto import pareto_tables
    from evolve.html_report.series import failure_table
    from evolve.storage import candidate_rank

    held = data.held_out
    baselines = table(["baseline", "model", "train fitness", "held-out fitness", "failure or note"],
                      [(e["name"], e["model"] or "equal-weights merge (1/M each)", e["fitness"],
                        e["held_out_fitness"], e["reason"] or e.get("note") or "") for e in data.baselines],
                      numeric=(2, 3), name="baselines") if data.baselines else \
        '<p data-table="baselines">No baselines in this run (it ran with --no-baselines, or they are being scored).</p>'
    # Feasible first (above every task floor), as the search ranks them.
    ok = sorted((r for r in data.train if r.get("status") == "ok" and not r.get("cached_from")),
                key=candidate_rank, reverse=True)[:10]
    top = table(["candidate", "fitness", "held-out", "scores"],
                [(r["eval_id"] + (f" (below a floor by {r['violation']:.3f})" if r.get("violation") else ""),
                  r["fitness"], (held.get(r["eval_id"]) or {}).get("fitness"),
                  ", ".join(f"{k}={v:.3f}" for k, v in (r.get("scores") or {}).items() if isinstance(v, float)))
                 for r in ok], numeric=(1, 2), name="top")
    return [("Baselines", baselines), ("Top candidates", top),
            *pareto_tables(data), ("Failures", failures_html(failure_table(data.records))),
            ("Provenance", table(["", ""], provenance_rows(data, gains), name="provenance"))]


def provenance_rows(data: RunData, gains: dict[str, Any]) -> list[tuple[str, Any]]:
    """(key, value) rows: seed, schedule, search settings, config hash, versions, counts."""
    m, prov = data.manifest, data.provenance or {}
    rows: list[tuple[str, Any]] = [(key, m.get(key)) for key in ("seed", "schedule", "strategy", "popsize", "sigma0",
                                                                    "max_fevals", "penalty", "dimension",
                                                                    "num_layers", "config_hash", "started")
                                   if key in m]
    rows += [("best candidate", prov.get("eval_id")), ("best recipe hash", prov.get("recipe_hash")),
             ("evaluations used", ", ".join(f"{k} {v}" for k, v in (prov.get("evaluations_used") or {}).items())),
             ("asked so far", data.asked), ("best parent", gains["best_parent"])]
    rows += [(f"version: {name}", version) for name, version in sorted((m.get("versions") or {}).items())]
    return [(k, v) for k, v in rows if v not in (None, "")]


def build_report(storage_path: Path, *, live: bool | None = None) -> str:
    """The HTML report of a run directory (read-only; ``live`` None: see whether a run holds it)."""
    from evolve.baselines import baseline_provenance
    from evolve.html_report.page import render_page

    data = load_run(Path(storage_path), live=live)
    best, held = data.best, data.best_held_out
    gains = baseline_provenance(data.records, best["fitness"] if best else None, held["fitness"] if held else None)
    details = [("best_config.yaml (the best recipe)", data.best_recipe_text or ""),
               ("config.yml (the run's config)", data.config_text or "")]
    return render_page(data, gains, _figures(data, gains), _tables(data, gains), details)


def write_html_report(storage_path: Path, out: Path | None = None, *, live: bool | None = None) -> Path:
    """Write :func:`build_report` to ``out`` (default ``STORAGE/report.html``; a directory: its
    ``report.html``) atomically; returns the path.  A place that cannot be written is a
    :class:`~merge_core.errors.RecipeError` naming ``--html``."""
    from merge_core.errors import RecipeError
    from merge_core.fsutil import atomic_write, overlap, real_path

    storage_path = Path(storage_path)
    target = storage_path / REPORT_FILE if out is None else Path(out)
    if target.is_dir():
        target = target / REPORT_FILE
    if not target.parent.is_dir():
        raise RecipeError("--html", f"'{target.parent}' is not a directory")
    own = storage_path / REPORT_FILE
    if real_path(target) != real_path(own) and overlap(target, storage_path) is not None:
        # The ledger, run.json, config.yml, best_config.yaml... a report must never replace them.
        raise RecipeError("--html", f"'{target}' is inside the run directory '{storage_path}', where only "
                                    f"'{own}' may be written (the run's own files would be lost)")
    text = build_report(storage_path, live=live)
    try:
        atomic_write(target, text.encode("utf-8"))
    except OSError as err:
        raise RecipeError("--html", f"cannot write '{target}': {err.strerror or err}") from None
    return target
