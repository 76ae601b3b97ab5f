"""Keeping the report's reference marks apart: labels that would print over each other, lines
that would hide each other.  Pure geometry (no matplotlib), so that it is unit-tested.

- :func:`label_offsets`: where to put the name of each marked point of a scatter panel (the
  parents in the trade-off panels): beside it, or moved up (then joined to it by a leader line)
  while its box would overlap a label already placed.
- :func:`interleaved_dashes`: dash patterns for ``n`` horizontal reference lines that take turns
  along the line, so that lines at (nearly) the same height still show every colour;
  :func:`reference_dashes` gives them to the lines that are that close, and only to those.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CHAR_WIDTH", "GAP", "LINE_HEIGHT", "interleaved_dashes", "label_offsets", "reference_dashes"]

CHAR_WIDTH = 4.3  # points per character of a 7-point label (a typical sans-serif's average)
LINE_HEIGHT = 9.0  # points per label line
GAP = 4.0  # points between a point and its label


def _box(x: float, y: float, dx: float, dy: float, text: str) -> tuple[float, float, float, float]:
    left, bottom = x + dx, y + dy
    return left, bottom, left + CHAR_WIDTH * len(text), bottom + LINE_HEIGHT


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def label_offsets(points: Sequence[tuple[float, float]], texts: Sequence[str], xlim: tuple[float, float],
                  ylim: tuple[float, float], size: tuple[float, float] = (200.0, 170.0),
                  tries: int = 12) -> list[tuple[float, float]]:
    """Offsets in points (for ``annotate(..., textcoords="offset points")``) of each text from
    its point, so that no two label boxes overlap.

    ``xlim``/``ylim`` are the axes' data limits and ``size`` the axes' size in points (the boxes
    are estimated from the text length).  Labels are placed from the lowest point up: each goes
    up-right of its point, else further up, one line at a time, else to the left.
    """
    (x0, x1), (y0, y1) = xlim, ylim
    sx, sy = size[0] / ((x1 - x0) or 1.0), size[1] / ((y1 - y0) or 1.0)
    at = [((x - x0) * sx, (y - y0) * sy) for x, y in points]
    placed: list[tuple[float, float, float, float]] = []
    out: list[tuple[float, float]] = [(GAP, GAP)] * len(points)
    for i in sorted(range(len(points)), key=lambda k: (at[k][1], at[k][0])):
        x, y = at[i]
        width = CHAR_WIDTH * len(texts[i])
        candidates = [(GAP, GAP + step * LINE_HEIGHT) for step in range(tries)]
        candidates += [(-GAP - width, GAP + step * LINE_HEIGHT) for step in range(tries)]
        for dx, dy in candidates:
            box = _box(x, y, dx, dy, texts[i])
            if not any(_overlap(box, other) for other in placed):
                break
        else:
            dx, dy = candidates[0]
            box = _box(x, y, dx, dy, texts[i])
        placed.append(box)
        out[i] = (dx, dy)
    return out


def interleaved_dashes(n: int, dash: float = 5.0) -> list[tuple[float, tuple[float, float]]]:
    """``(offset, (on, off))`` dash patterns (matplotlib's ``linestyle``) for ``n`` lines: line
    ``i`` draws its dash in the i-th slot of every period of ``n`` dashes, so lines drawn over
    each other alternate their colours instead of the last one hiding the others."""
    if n <= 1:
        return [(0.0, (dash, dash))] * n
    return [(((n - i) % n) * dash, (dash, (n - 1) * dash)) for i in range(n)]


def reference_dashes(values: Sequence[float], tolerance: float,
                     dash: float = 5.0) -> list[tuple[float, tuple[float, float]] | None]:
    """Per horizontal line at ``values``: an interleaved dash pattern when it lies within
    ``tolerance`` of another line (the group, chained, takes turns), else None (its own style)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and values[i] - values[groups[-1][-1]] <= tolerance:
            groups[-1].append(i)
        else:
            groups.append([i])
    out: list[tuple[float, tuple[float, float]] | None] = [None] * len(values)
    for group in groups:
        if len(group) > 1:
            for i, pattern in zip(sorted(group), interleaved_dashes(len(group), dash)):
                out[i] = pattern
    return out
