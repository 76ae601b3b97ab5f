"""The report page: one self-contained HTML file (inline CSS and SVG, no script, no external URL).

:func:`render_page` lays out the headline numbers, the figures (each a ``<figure class="chart"
data-figure=NAME>``) and the tables; every text from the run is escaped.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import Any

from evolve.baselines import START_ROLES, START_STACK, start_label
from evolve.html_report.series import FailureRow

__all__ = ["FIGURES", "Figure", "render_page", "table"]

# The figures a report has, in page order: (name, title).
FIGURES = (
    ("fitness", "Fitness over the run"),
    ("tasks", "Best vs parents, per task"),
    ("genome", "Best genome"),
    ("tradeoff", "Trade-offs between tasks"),
    ("dynamics", "Search dynamics"),
    ("timeline", "Worker timeline"),
)

CSS = """
:root { color-scheme: light; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: #1d2329;
       background: #f4f6f8; margin: 0; }
main { max-width: 1180px; margin: 0 auto; padding: 16px 20px 40px; }
h1 { font-size: 22px; margin: 8px 0 2px; }
h2 { font-size: 17px; margin: 0 0 4px; }
.sub { color: #58636e; margin: 0 0 14px; overflow-wrap: anywhere; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 13px; color: #fff;
         background: #5c6b77; vertical-align: 2px; }
.badge.live { background: #1e8e3e; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 0 0 16px; }
.card { background: #fff; border: 1px solid #dde3e8; border-radius: 8px; padding: 8px 12px; min-width: 128px;
        flex: 1 1 0; box-sizing: border-box; }
.card .k { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: #6a7680; }
.card .v { font-size: 22px; font-weight: 600; font-variant-numeric: tabular-nums; }
.card .n { font-size: 13px; color: #58636e; overflow-wrap: anywhere; }
.pos { color: #1e8e3e; } .neg { color: #c62828; }
section { background: #fff; border: 1px solid #dde3e8; border-radius: 8px; padding: 12px 16px; margin: 0 0 16px; }
.caption { color: #58636e; margin: 0 0 8px; font-size: 14px; }
figure.chart { margin: 0; overflow-x: auto; }
figure.chart svg { display: block; max-width: 100%; height: auto; margin: 0 auto; }
table { border-collapse: collapse; font-size: 14px; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 3px 12px 3px 0; border-bottom: 1px solid #edf0f2; vertical-align: top; }
th { color: #58636e; font-weight: 600; }
td.num { text-align: right; }
.cols { display: flex; flex-wrap: wrap; gap: 16px; } .cols > div { flex: 1 1 420px; min-width: 0; }
details pre { background: #f7f9fa; padding: 8px; overflow-x: auto; font-size: 13px; }
td.reason { max-width: 640px; overflow-wrap: anywhere; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A number for the page (``-`` when missing)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, numeric: Sequence[int] = (),
          name: str = "") -> str:
    """An HTML table (cells escaped; columns in ``numeric`` right-aligned)."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="{"num" if i in numeric else ""}">{_esc(fmt(c))}</td>'
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<table data-table="{_esc(name)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class Figure:
    """One figure of the page: its name, title, caption and SVG."""

    def __init__(self, name: str, title: str, caption: str, svg: str) -> None:
        self.name, self.title, self.caption, self.svg = name, title, caption, svg

    def html(self) -> str:
        """The figure's section."""
        return (f'<section id="{_esc(self.name)}"><h2>{_esc(self.title)}</h2><p class="caption">{_esc(self.caption)}'
                f'</p><figure class="chart" data-figure="{_esc(self.name)}">{self.svg}</figure></section>')


def _card(key: str, value: str, note: str = "", css: str = "") -> str:
    cls = f' class="v {css}"' if css else ' class="v"'
    return (f'<div class="card"><div class="k">{_esc(key)}</div><div{cls}>{_esc(value)}</div>'
            f'<div class="n">{_esc(note)}</div></div>')


def _gain_card(key: str, gain: float | None, parent: str | None) -> str:
    if gain is None:
        return _card(key, "-", "no parent scored yet")
    return _card(key, f"{gain:+.4f}", f"vs {parent}", "pos" if gain > 0 else "neg" if gain < 0 else "")


def headline(data: Any, gains: dict[str, Any]) -> str:
    """The status line and the cards of the headline numbers."""
    best, held = data.best, data.best_held_out
    train = data.train
    failed = sum(1 for r in train if r.get("status") != "ok")
    budget = data.manifest.get("max_fevals")
    summary = {e["name"]: e for e in data.baselines}
    parent = summary.get(gains["best_parent"] or "")
    equal = next((e for e in data.baselines if e["role"] in START_ROLES), None)
    stack = equal is not None and equal["role"] == START_STACK
    cards = [
        _card("best fitness", fmt(best["fitness"]) if best else "-", best["eval_id"] if best else "no success yet"),
        _card("held-out of best", fmt(held["fitness"]) if held else "-", "re-scored on other documents"),
        _card("best parent fitness", fmt(parent["fitness"]) if parent else "-",
              (parent["name"] + (f", held-out {fmt(parent['held_out_fitness'])}" if parent["held_out_fitness"]
                                 is not None else "")) if parent else "baselines not scored"),
        _gain_card("gain over best parent", gains["gain_over_best_parent"], gains["best_parent"]),
        _card(start_label(equal["role"]) if equal else "equal merge", fmt(equal["fitness"]) if equal else "-",
              "the search's start: the first source's layers" if stack else "every model weighted 1/M"),
        _card("evaluations", f"{len(train)}" + (f" / {budget}" if budget else ""),
              f"{failed} failed, {sum(1 for r in train if r.get('cached_from'))} cache hits"),
    ]
    if gains["held_out_gain_over_best_parent"] is not None:
        cards.insert(4, _gain_card("held-out gain", gains["held_out_gain_over_best_parent"], "best parent held-out"))
    return f'<div class="cards">{"".join(cards)}</div>'


def _status(data: Any) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(data.generated))
    last = data.last_update
    ago = f"; last result {time.strftime('%H:%M:%S', time.localtime(last))}" if last else ""
    badge = '<span class="badge live">running</span>' if data.live else '<span class="badge">not running</span>'
    started = data.manifest.get("started")
    return (f'<p class="sub">{badge} {_esc(data.path)} &middot; started {_esc(started or "-")} &middot; '
            f"report made {_esc(stamp)}{_esc(ago)}</p>")


def failures_html(rows: Sequence[FailureRow]) -> str:
    """The failures table (or a line saying there were none)."""
    if not rows:
        return '<p data-table="failures">No evaluation failed.</p>'
    body = "".join(f'<tr><td class="num">{r.count}</td><td>{_esc(", ".join(r.kinds))}</td>'
                   f'<td class="reason">{_esc(r.reason[:600])}</td><td>{_esc(", ".join(r.examples))}</td></tr>'
                   for r in rows)
    return ('<table data-table="failures"><thead><tr><th>count</th><th>kind</th><th>reason</th><th>e.g.</th>'
            f"</tr></thead><tbody>{body}</tbody></table>")


def render_page(data: Any, gains: dict[str, Any], figures: Sequence[Figure], tables: Sequence[tuple[str, str]],
                details: Sequence[tuple[str, str]]) -> str:
    """The whole page: ``tables`` and ``details`` are (title, HTML) and (title, preformatted text)."""
    refresh = '<meta http-equiv="refresh" content="60">' if data.live else ""
    sections = "".join(f.html() for f in figures)
    blocks = "".join(f'<section><h2>{_esc(title)}</h2>{body}</section>' for title, body in tables)
    extra = "".join(f"<details><summary>{_esc(title)}</summary><pre>{_esc(text)}</pre></details>"
                    for title, text in details if text)
    title = f"merge-evolve report: {data.path.name or data.path}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">{refresh}'
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>merge-evolve run report</h1>{_status(data)}{headline(data, gains)}{sections}{blocks}"
            f'<section><h2>Files</h2>{extra or "<p>none yet</p>"}</section></main></body></html>\n')
