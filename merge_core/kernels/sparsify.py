"""Sparsification of task vectors, as mergekit 0.1.5's ``sparsify`` does it, made cheap to repeat.

Four ways to drop elements of a task vector ``d = model - base`` (keeping a ``density``
fraction), each optionally followed by an L1 rescale (``rescale``: multiply what is kept so
its L1 norm equals the original's):

* ``magnitude`` (TIES): keep the ``max(1, int(density * n))`` largest ``|d|``.
* ``magnitude_outliers`` (breadcrumbs): drop the top ``gamma`` fraction, then keep the next
  ``int(density * n)`` largest.
* ``random`` (DARE): keep each element with probability ``density``.
* ``della_magprune`` (DELLA): keep each element with a probability from
  ``density - epsilon`` (smallest ``|d|`` of its row) to ``density + epsilon`` (largest).

Magnitude plans (one or two thresholds, ties kept in index order) come from
:mod:`~merge_core.kernels.magnitude`; DARE's from a uniform 16-bit field per model and call
(:mod:`~merge_core.kernels.random_fields`); DELLA's rank-dependent probability from
:mod:`~merge_core.kernels.della`, whose repeated merges with a fixed epsilon turn it into the same
kind of compare on a field of per-element keys.  This module picks the plan
(:func:`make_plan`) and applies plans to chunks of task vectors (:class:`Masker`).
"""

from __future__ import annotations

import numpy as np
import torch

from merge_core.errors import MethodError
from merge_core.kernels import della, magnitude
from merge_core.kernels.inputs import TensorInputs
from merge_core.kernels.plans import Plan
from merge_core.kernels.random_fields import cumulative_l1, random_field
from merge_core.kernels.task_vectors import l1_scale


def field16(inputs: TensorInputs, i: int, plan: Plan) -> torch.Tensor:
    """The int16 field a ``random`` plan of model ``i`` compares with its threshold (cached)."""
    if plan.field == "draws":  # else della.KEYS
        return random_field(inputs, i, plan.version)
    return della.keys(inputs, i, plan.version)


def field_l1(inputs: TensorInputs, i: int, plan: Plan) -> np.ndarray:
    """Cumulative ``sum |d|`` over the values of ``plan``'s field (float64, 65536 bins, value
    -32768 first): the L1 that keeping the values below any threshold keeps."""
    return cumulative_l1(inputs, i, plan.field, plan.version, lambda: field16(inputs, i, plan))


def make_plan(
    method: str,
    inputs: TensorInputs,
    i: int,
    density: float,
    rescale: bool,
    gamma: float = 0.0,
    epsilon: float = 0.0,
    seed: int = 0,
) -> Plan:
    """The sparsification of model ``i`` for ``density`` etc. (``method`` as in mergekit).

    ``seed`` is the call's stream seed (random methods only).
    """
    if density >= 1:
        return Plan("full")
    if method == "magnitude":
        return magnitude.magnitude_plan(inputs, i, density, rescale)
    if method == "magnitude_outliers":
        return magnitude.outliers_plan(inputs, i, density, gamma, rescale)
    if method == "random":
        thr = round(density * 65536) if density > 0 else 0
        if thr >= 65536:
            return Plan("full")
        if thr <= 0:
            return Plan("zero")
        plan = Plan("random", thr=float(thr - 32768), version=seed)
        if rescale:
            cum = field_l1(inputs, i, plan)
            plan.scale = l1_scale(float(cum[-1]), float(cum[thr - 1]))
        return plan
    if method == "della_magprune":
        if density <= 0:
            return Plan("zero")
        if density + epsilon >= 1 or density - epsilon <= 0:
            raise MethodError(
                f"model {i}: density {density} +/- epsilon {epsilon} must stay inside (0, 1)"
            )
        return della.plan(inputs, i, density, epsilon, rescale, seed)
    raise ValueError(f"unknown sparsification {method!r}")


class Masker:
    """Applies plans to chunks of task vectors in place, with scratch buffers reused across chunks."""

    def __init__(self, inputs: TensorInputs, step: int) -> None:
        dev, cd = inputs.tensors[0].device, inputs.compute_dtype
        self.inputs = inputs
        self._u = torch.empty(step, dtype=cd, device=dev)
        self._p = torch.empty(step, dtype=cd, device=dev)
        self._zero = torch.zeros((), dtype=cd, device=dev)

    def _band(self, plan: Plan, d: torch.Tensor, start: int) -> None:
        n = d.numel()
        splits = [min(max(cut.split - start, 0), n) for cut in plan.cuts]
        edges = sorted({0, n, *splits})
        for lo_edge, hi_edge in zip(edges, edges[1:]):
            seg = d[lo_edge:hi_edge]
            for cut, split in zip(plan.cuts, splits):
                bound = cut.bounds[0] if hi_edge <= split else cut.bounds[1]
                if cut.side == "lo":
                    torch.ops.aten.hardshrink.out(seg, bound, out=seg)
                else:
                    over = self._u[lo_edge:hi_edge]
                    torch.ops.aten.hardshrink.out(seg, bound, out=over)
                    seg.sub_(over)

    def apply(self, plan: Plan, i: int, d: torch.Tensor, start: int) -> None:
        """Zero the dropped elements of chunk ``d`` (model ``i``, elements from ``start``)."""
        n = d.numel()
        if plan.kind == "full":
            return
        if plan.kind == "band":
            self._band(plan, d, start)
            return
        u = self._u[:n]
        if plan.kind == "random":
            u.copy_(field16(self.inputs, i, plan)[start : start + n])  # int16 -> float: fast
            torch.sub(self._zero.fill_(plan.thr), u, out=u)  # thr - value >= 1 exactly when kept
            u.clamp_(0, 1)
        else:
            u.copy_(random_field(self.inputs, i, plan.version)[start : start + n])
            della.mask_chunk(u, della.rank_norm(self.inputs, i)[start : start + n], plan, self._p[:n])
        d.mul_(u)
