"""The report's reference marks stay readable: parents' lines with near-equal fitness, parents'
names at nearly the same point of a trade-off panel; and the live report's warnings come once."""

from __future__ import annotations

import re
from pathlib import Path

from evolve.html_report import plots
from evolve.html_report.compare import TradeoffPanel
from evolve.html_report.labels import CHAR_WIDTH, LINE_HEIGHT, interleaved_dashes, label_offsets, reference_dashes
from evolve.html_report.series import fitness_trace
from evolve.observers.html_report import HtmlReportObserver


def _boxes(points, texts, offsets, xlim, ylim, size=(200.0, 170.0)):
    sx, sy = size[0] / (xlim[1] - xlim[0]), size[1] / (ylim[1] - ylim[0])
    out = []
    for (x, y), text, (dx, dy) in zip(points, texts, offsets):
        left, bottom = (x - xlim[0]) * sx + dx, (y - ylim[0]) * sy + dy
        out.append((left, bottom, left + CHAR_WIDTH * len(text), bottom + LINE_HEIGHT))
    return out


def test_labels_at_nearly_the_same_point_are_moved_apart() -> None:
    points = [(0.31, 0.28), (0.315, 0.281), (0.9, 0.1), (0.312, 0.279)]  # base, arith, spatial, equal merge
    texts = ["base", "arith", "spatial", "equal_merge"]
    offsets = label_offsets(points, texts, (0.0, 1.0), (0.0, 1.0))
    boxes = _boxes(points, texts, offsets, (0.0, 1.0), (0.0, 1.0))
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    assert offsets[2] == (4.0, 4.0)  # a label with room keeps its place beside its point


def test_coinciding_reference_lines_take_turns() -> None:
    dashes = interleaved_dashes(3)
    period = sum(dashes[0][1])
    slots = sorted(((-offset) % period) for offset, _ in dashes)  # where each line's dash starts
    assert slots == [0.0, 5.0, 10.0] and all(d[1] == (5.0, 10.0) for d in dashes)
    assert interleaved_dashes(1) == [(0.0, (5.0, 5.0))]
    # Only lines close to another take turns; a line alone keeps its own style.
    close = reference_dashes([0.49, 0.2, 0.489, 0.4], tolerance=0.01)
    assert close[1] is None and close[3] is None and close[0] != close[2] and None not in (close[0], close[2])


def _line_styles(svg: str) -> dict[str, set[str]]:
    """stroke colour -> the dash offsets of its dashed lines in an SVG (the line, its legend key)."""
    out: dict[str, set[str]] = {}
    for style in re.findall(r'style="([^"]*stroke-dasharray[^"]*)"', svg):
        color = re.search(r"stroke: (#[0-9a-f]{6})", style)
        offset = re.search(r"stroke-dashoffset: ([0-9.]+)", style)
        if color:
            out.setdefault(color.group(1), set()).add(offset.group(1) if offset else "0")
    return out


def test_parents_with_near_equal_fitness_draw_distinguishable_lines() -> None:
    trace = fitness_trace([{"eval_id": "c000000", "kind": "train", "status": "ok", "fitness": 0.6, "x": [0.0],
                            "scores": {}, "cached_from": None, "generation": 0}])
    baselines = [{"name": "spatial", "role": "model", "fitness": 0.4900},
                 {"name": "format", "role": "model", "fitness": 0.4890}]
    colors = plots.baseline_colors(baselines)
    styles = _line_styles(plots.fitness_svg(trace, baselines, colors))
    assert colors["spatial"] in styles and colors["format"] in styles
    assert styles[colors["spatial"]] != styles[colors["format"]]  # dashes in different slots: both show


def test_tradeoff_panel_labels_do_not_collide() -> None:
    panel = TradeoffPanel("toy_spatial", "toy_arith", ids=["c0", "c1"], xs=[0.2, 0.8], ys=[0.3, 0.6],
                          front=[False, True], best=(0.8, 0.6),
                          references=[("base", "base", 0.315, 0.28), ("arith", "model", 0.31, 0.285)])
    svg = plots.tradeoff_svg([panel], {"base": "#7f7f7f", "arith": "#2ca02c"})
    ys = {name: float(y) for y, name in re.findall(r'<text[^>]* y="([0-9.]+)"[^>]*>(base|arith)</text>', svg)}
    assert set(ys) == {"base", "arith"} and abs(ys["base"] - ys["arith"]) >= 8  # one line apart at least


def test_a_missing_module_or_a_repeated_failure_warns_once(tmp_path: Path, capsys, monkeypatch) -> None:
    import evolve.html_report

    calls = []

    def no_matplotlib(*_a, **_k):
        calls.append(1)
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(evolve.html_report, "write_html_report", no_matplotlib)
    observer = HtmlReportObserver(tmp_path)
    for _ in range(3):  # three tell batches, then the run closes
        observer._write()
    observer.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No module named 'matplotlib'" in err[0] and "pip install matplotlib" in err[0]
    assert len(calls) == 1  # not tried again: the module will not appear mid-run

    def broken(*_a, **_k):
        raise ValueError("bad ledger line")

    monkeypatch.setattr(evolve.html_report, "write_html_report", broken)
    observer = HtmlReportObserver(tmp_path)
    for _ in range(3):
        observer._write()
    assert capsys.readouterr().err.count("bad ledger line") == 1 and observer.errors == 3


