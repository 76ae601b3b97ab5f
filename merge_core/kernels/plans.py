"""How one model's task vector is sparsified for one call: :class:`Plan` and its :class:`Cut` s.

Plans are made by :func:`~merge_core.kernels.sparsify.make_plan` (magnitude plans by
:mod:`~merge_core.kernels.magnitude`, DELLA's by :mod:`~merge_core.kernels.della`) and applied
by :class:`~merge_core.kernels.sparsify.Masker` (eager) or :mod:`~merge_core.kernels.fused`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Cut:
    """One magnitude threshold of a ``band`` plan.

    ``side == "lo"`` keeps ``|d| > value``, ``"hi"`` keeps ``|d| < value``.  Elements with
    ``|d| == value`` at flat indices below ``split`` are kept when ``first_kept`` (else dropped);
    those from ``split`` on get the opposite treatment.
    """

    value: float
    side: str
    first_kept: bool
    split: int
    bounds: tuple[float, float] = (0.0, 0.0)  # ``hardshrink`` bounds before / from ``split``


@dataclass
class Plan:
    """How one model's task vector is sparsified for one call.

    ``kind``: ``full`` (untouched), ``zero`` (all dropped), ``band`` (keep between ``cuts``),
    ``random`` (keep if the ``field`` value < ``thr``), ``della`` (keep if the draw minus
    ``b * rank`` is <= ``a``; see :mod:`~merge_core.kernels.della`).
    ``field`` names the 16-bit field a ``random`` plan compares (``draws``: the random draws;
    ``della_keys``: DELLA's keys) and ``version`` what it is built from (the call's stream seed;
    for keys ``(seed, slope)``).  ``scale`` multiplies what is kept; ``l1_before`` is set when
    the kept L1 still has to be measured (DELLA's rescale without a lookup).
    """

    kind: str
    cuts: list[Cut] = field(default_factory=list)
    thr: float = 0.0
    a: float = 0.0
    b: float = 0.0
    scale: float = 1.0
    l1_before: float | None = None
    field: str = "draws"
    version: Any = 0
