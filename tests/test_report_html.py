"""``merge-evolve report --html``: the numbers behind each figure, the page on real runs (offline,
read-only, every figure), and the page in a real headless Chromium (every figure drawn, no
console error, a screenshot)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from browser_check import open_in_browser
from evolve.cli import main as merge_evolve
from evolve.config import parse_evolve_config
from evolve.genome import Genome
from evolve.html_report import build_report, run_is_live, write_html_report
from evolve.html_report.compare import genome_panels, pareto_mask, task_comparison, tradeoff_pairs
from evolve.html_report.page import FIGURES
from evolve.html_report.series import batch_spread, failure_table, fitness_trace, worker_timeline
from evolve.observers.html_report import HtmlReportObserver

REPO = Path(__file__).resolve().parents[1]
FIGURE_NAMES = [name for name, _ in FIGURES]


def _train(i: int, fitness: float, status: str = "ok", *, generation: int = 0, x=(0.0, 0.0), scores=None,
           **extra) -> dict:
    rec = {"eval_id": f"c{i:06d}", "kind": "train", "status": status, "fitness": fitness, "generation": generation,
           "x": list(x), "scores": scores or {}, "cached_from": None, "reason": None if status == "ok" else "boom"}
    rec.update(extra)
    return rec


def _job(eval_id: str, kind: str, worker: str, done: float, run: float, status: str = "ok") -> dict:
    return {"eval_id": eval_id, "kind": kind, "worker": worker, "node": "n1", "status": status,
            "timings": {"done_unix": done, "run": run}}


# -- the numbers each figure is drawn from --------------------------------------------------


def test_fitness_trace_best_so_far_skips_failures_and_estimates():
    records = [
        {"eval_id": "c000000", "kind": "ask"},
        _train(0, 0.3), _train(1, -2.0, "failed"), _train(2, 0.9, race={"stopped": True}),
        _train(3, 0.5, cached_from="c000000"), _train(4, 0.4),
        {"eval_id": "c000004/held_out", "kind": "held_out", "of": "c000004", "status": "ok", "fitness": 0.38},
        {"eval_id": "c000001/held_out", "kind": "held_out", "of": "c000001", "status": "failed", "fitness": -2.0},
    ]
    trace = fitness_trace(records)
    assert [p.n for p in trace.points] == [1, 2, 3, 4, 5]
    assert [(p.status, p.cached, p.estimate) for p in trace.points][1:4] == [
        ("failed", False, False), ("ok", False, True), ("ok", True, False)]
    assert trace.best == [(1, 0.3), (2, 0.3), (3, 0.3), (4, 0.5), (5, 0.5)]
    assert trace.held_out == [(5, 0.38, "c000004/held_out")]
    assert not any(p.design for p in trace.points)  # a run without a start design


def test_fitness_trace_marks_the_start_design_by_ask_order():
    from evolve.html_report import plots

    records = [_train(0, 0.3, seq=0), _train(2, 0.5, seq=2), _train(1, 0.4, seq=1), _train(3, 0.6, seq=3),
               _train(4, 0.6)]  # a record of 0.1 has no seq: never the design's
    trace = fitness_trace(records, design=2)
    assert [p.design for p in trace.points] == [True, False, True, False, False]
    svg = plots.fitness_svg(trace, [], {})
    assert "start design (space-filling)" in svg
    assert "start design" not in plots.fitness_svg(fitness_trace(records), [], {})


def test_batch_spread_per_tell_batch():
    records = [_train(0, 0.1, x=(0.0, 1.0)), _train(1, 0.3, x=(1.0, 1.0)),
               _train(2, 0.5, generation=1, x=(0.5, 0.0)), _train(3, 0.2, "failed", generation=1, x=(0.5, 0.0))]
    first, second = batch_spread(records, genes=("weight", "density"), x0=(0.0, 0.0))
    assert (first.batch, first.size, second.size) == (0, 2, 2)
    assert first.spread_by_gene == {"weight": pytest.approx(0.5), "density": 0.0}
    assert first.spread == pytest.approx((0.25 / 2) ** 0.5)  # RMS over genes of the std across the batch
    assert first.drift == pytest.approx(0.625 ** 0.5)  # RMS distance of the mean (0.5, 1) from (0, 0)
    assert (first.best, first.median, first.worst) == (0.3, pytest.approx(0.2), 0.1)
    assert second.spread == 0.0 and second.best == second.worst == 0.5  # the failure is left out of the fitness


def test_worker_timeline_rows_busy_and_cut_pauses():
    records = [
        _job("baseline/a", "baseline", "worker-1", 110.0, 10.0),
        _job("c000000", "train", "worker-0", 110.0, 10.0),
        _job("c000001", "train", "worker-10", 120.0, 10.0, status="failed"),
        _job("c000000/held_out", "held_out", "worker-0", 130.0, 10.0),
        {"eval_id": "c000002", "kind": "train", "worker": None, "timings": {}},  # a cache hit: no job
        _job("c000003", "train", "worker-0", 10130.0, 10.0),  # resumed much later
    ]
    tl = worker_timeline(records)
    assert tl.rows == ["worker-0", "worker-1", "worker-10"]  # natural order
    assert tl.t0 == 100.0
    assert [(b.row, b.start, b.end, b.kind, b.status) for b in tl.bars[:4]] == [
        (1, 0.0, 10.0, "baseline", "ok"), (0, 0.0, 10.0, "train", "ok"), (2, 10.0, 20.0, "train", "failed"),
        (0, 20.0, 30.0, "held_out", "ok")]
    # The pause (10 000 s with nothing running) is cut to two median jobs and marked.
    assert len(tl.breaks) == 1 and tl.breaks[0] == (pytest.approx(40.0), pytest.approx(9990.0))
    assert tl.bars[-1].start == pytest.approx(50.0) and tl.length == pytest.approx(60.0)
    assert tl.busy == [pytest.approx(30 / 60), pytest.approx(10 / 60), pytest.approx(10 / 60)]
    assert worker_timeline([]).bars == []


def test_failure_table_groups_by_reason():
    records = [_train(0, -2, "failed", reason="out of memory"), _train(1, -2, "failed", reason="nan weights"),
               _train(2, -2, "failed", reason="out of memory"),
               _train(3, -2, "failed", reason="out of memory", cached_from="c000000"),  # counted once
               {"eval_id": "baseline/x", "kind": "baseline", "status": "failed", "reason": "nan weights"}]
    rows = failure_table(records)
    assert [(r.reason, r.count, r.kinds) for r in rows] == [("nan weights", 2, ("train", "baseline")),
                                                            ("out of memory", 2, ("train",))]
    assert rows[1].examples == ("c000000", "c000002")


def test_pareto_mask_keeps_the_non_dominated():
    xs = [0.1, 0.5, 0.9, 0.5, 0.4, 0.9, 0.2]
    ys = [0.9, 0.5, 0.1, 0.5, 0.4, 0.05, 0.9]
    # (0.5, 0.5) twice: both kept; (0.4, 0.4) dominated by it; (0.9, 0.05) by (0.9, 0.1); (0.1, 0.9) by (0.2, 0.9)
    assert pareto_mask(xs, ys) == [False, True, True, True, False, False, True]
    assert pareto_mask([], []) == []


def _config(method: str = "task_arithmetic", filters=None, tasks=("a", "b", "c")):
    genome = {"models": ["zoo/m1", "zoo/m2"], "base_model": "zoo/base", "merge_method": method,
              "layer_granularity": 2, "filters": filters}
    return parse_evolve_config({"genome": genome, "tasks": [{"name": t, "weight": w} for t, w in zip(tasks, (3, 2, 1))],
                                "held_out": [{"name": "h"}]})


def test_tradeoff_pairs_and_task_comparison():
    config = _config()
    records = [_train(0, 0.0, scores={"a": 0.9, "b": 0.1, "c": 0.5}), _train(1, 0.0, scores={"a": 0.2, "b": 0.8, "c": 0.5}),
               _train(2, 0.0, scores={"a": 0.1, "b": 0.1, "c": 0.9}), _train(3, 0.0, "failed", scores={})]
    baselines = [{"name": "m1", "role": "model", "scores": {"a": 0.5, "b": 0.5}, "held_out_scores": {"h": 0.3}},
                 {"name": "equal_merge", "role": "equal_merge", "scores": {}, "held_out_scores": {}}]
    pairs = tradeoff_pairs(records, config.tasks, baselines, "c000001")
    assert [(p.task_x, p.task_y) for p in pairs] == [("a", "b"), ("a", "c"), ("b", "c")]  # heaviest first
    assert pairs[0].ids == ["c000000", "c000001", "c000002"] and pairs[0].front == [True, True, False]
    assert pairs[0].best == (0.2, 0.8) and pairs[0].references == [("m1", "model", 0.5, 0.5)]
    assert pairs[1].front == [True, False, True] and pairs[2].references == []  # (0.2, 0.5) by (0.9, 0.5)
    best, held = records[1], {"scores": {"h": 0.4}}
    train_panel, held_panel = task_comparison(best, held, baselines, config.tasks, config.held_out)
    assert train_panel.tasks == ("a", "b", "c")
    assert [(s.label, s.role, s.values) for s in train_panel.series] == [
        ("best (c000001)", "best", (0.2, 0.8, 0.5)), ("m1", "model", (0.5, 0.5, None))]
    assert [s.values for s in held_panel.series] == [(0.4,), (0.3,)]


def test_genome_panels_as_merged_one_per_gene_and_filter():
    genome = Genome(_config("ties", filters=["self_attn"]).genome, 4)
    assert genome.shape == (2, 2, 2, 2)
    x = [0.1 * i for i in range(genome.dimension)]
    x[1] = 1.7  # a density above its box: merged clipped into it
    panels = genome_panels(genome, x)
    assert [p.title for p in panels] == ["weight, tensors matching 'self_attn'", "weight, other tensors",
                                         "density, tensors matching 'self_attn'", "density, other tensors"]
    assert panels[0].rows == ("layers 0-1", "layers 2-3") and panels[0].cols == ("m1", "m2")
    flat = genome.encode(genome.decode(x))  # what the recipe uses, in genome order (g, m, f, p)
    assert panels[2].values[0][0] == pytest.approx(flat[1]) and panels[2].values[0][0] <= panels[2].vmax
    assert panels[1].values[1][0] == pytest.approx(flat[((1 * 2 + 0) * 2 + 1) * 2 + 0])
    assert (panels[0].vmin, panels[0].vmax) == tuple(genome.bounds[i][0] for i in (0, 1))


# -- the page, on a real run ----------------------------------------------------------------


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.scripts += tag == "script"
        self.urls += [v or "" for k, v in attrs if k in ("src", "href", "xlink:href", "action", "poster")]


def check_page(text: str) -> None:
    """Every figure is there as SVG, and nothing points outside the file."""
    for name in FIGURE_NAMES:
        assert f'data-figure="{name}"' in text, name
    links = _Links()
    links.feed(text)
    inside = [u for u in links.urls if u.startswith("#") or u.startswith("data:image/")]
    assert links.urls and inside == links.urls, [u[:80] for u in links.urls if u not in inside]
    assert links.scripts == 0 and "@import" not in text and "url(http" not in text


def _small_config(models: dict[str, Path], tmp_path: Path) -> Path:
    data = {"genome": {"models": [str(models["e1"]), str(models["e2"])], "base_model": str(models["base"]),
                       "merge_method": "task_arithmetic", "layer_granularity": 2},
            "tasks": [{"name": "toy_arith", "weight": 0.6}, {"name": "toy_prompt_format", "weight": 0.4}],
            "held_out": [{"name": "toy_arith_heldout"}], "limit": 12, "apply_chat_template": False}
    path = tmp_path / "evolve.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def small_run(task_models, tmp_path_factory) -> Path:
    """A finished 6-evaluation run on the tiny task models (one in-process worker)."""
    root = tmp_path_factory.mktemp("small_run")
    run = root / "run"
    assert merge_evolve([str(_small_config(task_models, root)), "--storage-path", str(run), "--no-ray",
                         "--max-fevals", "6", "--force-population-size", "3", "-q", "--no-save-final-model"]) == 0
    return run


def test_a_run_writes_its_report_and_report_html_rewrites_it_read_only(small_run: Path, tmp_path: Path, capsys):
    written_by_run = (small_run / "report.html").read_text()
    check_page(written_by_run)
    before = {p.name: p.read_bytes() for p in small_run.iterdir() if p.name != "report.html"}
    assert merge_evolve(["report", "--storage-path", str(small_run), "--html"]) == 0
    assert f"html report: {small_run / 'report.html'}" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in small_run.iterdir() if p.name != "report.html"} == before
    assert not [p for p in small_run.iterdir() if p.name.startswith(".report.html")]  # no temporary left
    text = (small_run / "report.html").read_text()
    check_page(text)
    ledger = [json.loads(line) for line in (small_run / "evaluations.jsonl").read_text().splitlines()]
    best = json.loads((small_run / "best_config.provenance.json").read_text())
    parent = max(r["fitness"] for r in ledger if r["kind"] == "baseline" and r["role"] != "equal_merge"
                 and r["task_set"] == "train")
    assert f"{best['train_fitness']:.4f}" in text and f"{parent:.4f}" in text and "best parent fitness" in text.lower()
    # Elsewhere: a file path, or a folder (its report.html).
    assert merge_evolve(["report", "--storage-path", str(small_run), "--html", str(tmp_path / "r.html"), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["best"] is not None and "html report:" in captured.err
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    assert write_html_report(small_run, tmp_path) == tmp_path / "report.html"


def test_report_html_bad_place_is_one_line_naming_the_flag(small_run: Path, tmp_path: Path, capsys):
    assert merge_evolve(["report", "--storage-path", str(small_run), "--html", str(tmp_path / "no" / "r.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("merge-evolve: error: --html:") and len(err.splitlines()) == 1


def test_report_of_a_run_still_going_and_of_one_without_results(small_run: Path, tmp_path: Path):
    live = build_report(small_run, live=True)
    assert 'http-equiv="refresh"' in live and ">running<" in live
    check_page(live)
    # A run whose search has not asked anything yet: the page still has every figure (placeholders).
    young = tmp_path / "young"
    young.mkdir()
    lines = (small_run / "evaluations.jsonl").read_text().splitlines()
    (young / "evaluations.jsonl").write_text("\n".join(l for l in lines if '"baseline"' in l) + "\n" + lines[-1][:20])
    text = build_report(young)
    check_page(text)
    assert "nothing to show yet" in text


def test_the_observer_refreshes_the_page_while_the_run_goes(small_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    (run / "report.html").unlink()
    observer = HtmlReportObserver(run)
    observer.on_start(None)  # drawn in the background, as the search goes on
    deadline = time.monotonic() + 60
    while not (run / "report.html").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert 'class="badge live"' in (run / "report.html").read_text()
    observer.on_new_best({}, {}, None)
    observer.close()  # the final page: the search is over
    text = (run / "report.html").read_text()
    assert 'class="badge live"' not in text and 'http-equiv="refresh"' not in text and observer.errors == 0


def test_a_run_holding_its_lock_is_live(tmp_path: Path):
    from evolve.lock import RunLock

    assert not run_is_live(tmp_path)
    with RunLock(tmp_path):
        assert run_is_live(tmp_path)
    assert not run_is_live(tmp_path)


def test_the_observer_never_stops_a_run(tmp_path: Path, capsys):
    observer = HtmlReportObserver(tmp_path / "missing")
    observer.on_start(None)
    observer.on_new_best({}, {}, None)
    observer.close()  # the directory holds no run: a warning, no exception
    assert "could not write the HTML report" in capsys.readouterr().err and observer.errors >= 1


def test_help_and_the_text_report_import_no_plotting():
    probe = ("import sys, evolve.cli as c, evolve.report; c.build_parser('report'); c.build_parser('run'); "
             "print(sorted(m for m in ('matplotlib', 'playwright') if m in sys.modules))")
    assert subprocess.check_output([sys.executable, "-c", probe], text=True).strip() == "[]"


def test_the_report_in_a_real_browser(small_run: Path, tmp_path: Path):
    page = open_in_browser(small_run / "report.html", tmp_path / "small_run.png")
    assert [f["name"] for f in page["figures"]] == FIGURE_NAMES


# -- the bar: the toy config, 24 evaluations -----------------------------------------


@pytest.mark.slow
def test_toy_run_report_has_every_figure_and_opens_in_a_browser(toy_zoo, tmp_path: Path):
    (tmp_path / "zoo").symlink_to(toy_zoo.root, target_is_directory=True)
    exe = Path(sys.executable).with_name("merge-evolve")
    cmd = [str(exe), str(REPO / "configs" / "toy.yml"), "--storage-path", "runs/toy", "--max-fevals", "24",
           "-q", "--no-save-final-model"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "toy"
    out = subprocess.run([str(exe), "report", "--storage-path", str(run), "--html"], capture_output=True, text=True)
    assert out.returncode == 0 and "best vs best parent" in out.stdout, out.stdout + out.stderr
    text = (run / "report.html").read_text()
    check_page(text)
    best = json.loads((run / "best_config.provenance.json").read_text())
    parent = next(b for b in best["baselines"] if b["name"] == best["best_parent"])
    assert f"{best['train_fitness']:.4f}" in text and f"{parent['train_fitness']:.4f}" in text
    assert "nothing to show yet" not in text and text.count("<svg") == len(FIGURE_NAMES)
    assert text.count('id="fig-tradeoff-axes_') == 3  # 3 tasks: a panel per pair
    shots = Path(os.environ.get("REPORT_SCREENSHOT_DIR") or tmp_path)
    page = open_in_browser(run / "report.html", shots / "toy_report.png")
    assert [f["name"] for f in page["figures"]] == FIGURE_NAMES and page["svgs"] == len(FIGURE_NAMES)


def test_dynamics_of_batches_without_a_success_say_so_without_warnings():
    import warnings

    from evolve.html_report import plots
    from evolve.html_report.series import BatchStat

    stats = [BatchStat(b, 4, 0.2, {"weight": 0.2}, 0.1 * b, None, None, None) for b in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warned of an empty legend here
        svg = plots.dynamics_svg(stats)
    assert "no successful candidate yet" in svg
