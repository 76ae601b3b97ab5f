"""``merge-evolve report``: what a run directory holds, for people and for scripts.

Read-only: it never writes into the run directory (a run may be going on in it), except the
HTML report that ``--html`` asks for (:mod:`evolve.html_report`, written atomically).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from merge_core.errors import RecipeError


def summarize(storage_path: Path) -> dict[str, Any]:
    """Counts, the best candidate (train and held-out; :func:`evolve.storage.best_record`, the
    one ``best_config.yaml`` holds), the top five scored in full and the baselines (the
    input models and the equal merge, :mod:`evolve.baselines`) of a run directory."""
    from evolve.baselines import baseline_provenance, baseline_summary
    from evolve.ledger_check import readable_records
    from evolve.pareto_export import report_front
    from evolve.racing import stopped_early
    from evolve.storage import RunStorage, best_record, candidate_rank

    if not (storage_path / "evaluations.jsonl").exists() and not (storage_path / "run.json").exists():
        raise RecipeError("--storage-path", f"'{storage_path}' holds no merge-evolve run")
    storage = RunStorage(storage_path)
    # Read-only: a torn last line is skipped, not cut; records the report cannot read are named once.
    records, problems = readable_records(storage.load_evaluations(repair=False))
    manifest = storage.read_manifest() or {}
    train = [r for r in records if r.get("kind") == "train"]
    held = {r["of"]: r for r in records if r.get("kind") == "held_out"}
    # Ranked: successful candidates scored on every document (a raced one stopped early has an estimate).
    ok = sorted((r for r in train if r["status"] == "ok" and not stopped_early(r)), key=candidate_rank, reverse=True)
    failed = [r for r in train if r["status"] == "failed"]

    def brief(r: dict[str, Any]) -> dict[str, Any]:
        h = held.get(r["eval_id"])
        return {"eval_id": r["eval_id"], "fitness": r["fitness"], "scores": r["scores"],
                "held_out_fitness": h["fitness"] if h else None, "violation": r.get("violation") or 0.0}

    best = best_record(train, storage.read_provenance())
    best_held = held.get(best["eval_id"]) if best else None
    gains = baseline_provenance(records, best["fitness"] if best else None,
                                best_held["fitness"] if best_held and best_held["status"] == "ok" else None)
    return {
        "storage_path": str(storage_path),
        "seed": manifest.get("seed"),
        "budget": manifest.get("max_fevals"),
        "popsize": manifest.get("popsize"),
        "evaluations": len([r for r in train if r.get("cached_from") is None]),
        "cache_hits": len([r for r in train if r.get("cached_from") is not None]),
        "failed": len(failed),
        "failure_reasons": sorted({r.get("reason") or "" for r in failed})[:5],
        # Whole generations (popsize results each: the tells, as the run's closing line counts
        # them), and the results of the one not complete yet.
        "generations": len(train) // manifest["popsize"] if manifest.get("popsize") else
        len({r["generation"] for r in train}),
        "partial_generation": len(train) % manifest["popsize"] if manifest.get("popsize") else 0,
        "best": brief(best) if best else None,
        "top": [brief(r) for r in ok[:5]],
        "baselines": [{k: e[k] for k in ("name", "model", "role", "fitness", "held_out_fitness", "reason", "note")}
                      for e in baseline_summary(records)],
        "best_parent": gains["best_parent"],
        "gain_over_best_parent": gains["gain_over_best_parent"],
        "held_out_gain_over_best_parent": gains["held_out_gain_over_best_parent"],
        "best_config": str(storage_path / "best_config.yaml") if (storage_path / "best_config.yaml").exists() else None,
        "ledger_problems": problems,
        "pareto": report_front(manifest, records),  # None unless search.objectives: pareto
    }


def report(storage_path: Path, *, as_json: bool = False, html: str | None = None) -> int:
    """Print the summary of a run directory; exit code 0.  ``html``: also write the HTML report
    there ("" = ``DIR/report.html``)."""
    from evolve.ledger_check import ledger_warning

    summary = summarize(storage_path)
    warning = ledger_warning(summary["ledger_problems"])
    if warning is not None:
        print(f"merge-evolve report: {warning}", file=sys.stderr)
    if html is not None:
        from evolve.html_report import write_html_report

        written = write_html_report(storage_path, Path(html) if html else None)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    if html is not None:  # beside JSON on stdout, the path goes to stderr
        print(f"html report: {written}", file=sys.stderr if as_json else sys.stdout)
    return 0


def _fitness(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _print_baselines(summary: dict[str, Any]) -> None:
    if not summary["baselines"]:
        return
    print(f"baselines{'':<17}{'fitness':>9}{'held-out':>10}")
    for e in summary["baselines"]:
        label = e["name"] if e["model"] is None or e["model"] == e["name"] else f"{e['name']} ({e['model']})"
        failed = f"  failed: {e['reason']}" if e["reason"] else (f"  ({e['note']})" if e.get("note") else "")
        print(f"  {label[:24]:<24}{_fitness(e['fitness']):>9}{_fitness(e['held_out_fitness']):>10}{failed}")
    gain = summary["gain_over_best_parent"]
    if gain is not None:
        line = f"best vs best parent ({summary['best_parent']}): {gain:+.4f}"
        if summary["held_out_gain_over_best_parent"] is not None:
            line += f", held-out {summary['held_out_gain_over_best_parent']:+.4f}"
        print(line)


def _partial(summary: dict[str, Any]) -> str:
    n = summary.get("partial_generation") or 0
    return f" (+{n} of the next)" if n else ""


def _print_summary(summary: dict[str, Any]) -> None:
    print(f"run {summary['storage_path']}: {summary['evaluations']} evaluations "
          f"({summary['cache_hits']} cache hits, {summary['failed']} failed) over "
          f"{summary['generations']} generations{_partial(summary)}; budget {summary['budget']}, "
          f"seed {summary['seed']}")
    for reason in summary["failure_reasons"]:
        print(f"  failure: {reason}")
    _print_baselines(summary)
    if summary["best"] is None:
        print("no successful candidate yet")
        return
    print(f"{'eval_id':<14}{'fitness':>9}{'held-out':>10}  scores")
    for r in summary["top"]:
        held = "-" if r["held_out_fitness"] is None else f"{r['held_out_fitness']:.4f}"
        scores = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r["scores"].items())
        below = f"  (below a floor by {r['violation']:.3f})" if r.get("violation") else ""
        print(f"{r['eval_id']:<14}{r['fitness']:>9.4f}{held:>10}  {scores}{below}")
    if summary["best_config"]:
        print(f"best recipe: {summary['best_config']}")
    if summary.get("pareto"):
        from evolve.pareto_export import print_front

        print_front(summary["pareto"])
