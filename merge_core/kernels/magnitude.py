"""Magnitude sparsification (TIES' ``magnitude``, breadcrumbs' ``magnitude_outliers``) as plans.

* ``magnitude``: keep the ``max(1, int(density * n))`` largest ``|d|``.
* ``magnitude_outliers``: drop the top ``gamma`` fraction, then keep the next
  ``int(density * n)`` largest.

A plan is one or two *cuts* (a threshold magnitude and which side is kept), applied per chunk
with ``hardshrink``.  The thresholds come from order statistics of ``|d|``: one-shot merges
(``TensorInputs.reuse`` False) partition a copy (numpy's SIMD introselect, no sort); the
in-memory merger caches ``|d|`` per model sorted with its flat index as tie-breaker (8 bytes
per element, :class:`SortedKeys`), so any density's threshold and the index where its ties
split are binary searches.  Elements whose magnitude equals a threshold (frequent with bf16
checkpoints) are kept in index order, as a *stable* sort in mergekit's direction would keep
them; mergekit's own unstable ``argsort`` picks an implementation-defined subset of those equal
elements instead.  The number kept, the kept L1 and every element with another magnitude are
identical to mergekit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from merge_core.kernels.caches import cached
from merge_core.kernels.chunking import flat
from merge_core.kernels.inputs import TensorInputs
from merge_core.kernels.plans import Cut, Plan
from merge_core.kernels.task_vectors import NUMPY_DTYPES, abs_numpy, l1_scale


@dataclass
class _Stats:
    """Order statistics of ``|d|`` at two ascending-sort positions ``lo <= hi``."""

    values: tuple[float, float]
    below: tuple[int, int]  # elements strictly smaller than each value
    upto: tuple[int, int]  # elements smaller or equal
    l1_total: float
    l1_kept: float  # sum of the ascending-sorted magnitudes at positions lo..hi


class SortedKeys:
    """``|d|`` of one model sorted ascending, ties in index order, as int64 keys
    ``(float32 bits of |d|) << 32 | flat index`` (non-negative float32 bits order like the floats).

    Cached by the in-memory merger: a candidate's order statistics are lookups, and so is the
    index where the ties at a threshold split (:func:`_tie_split`), which otherwise scans the tensor.
    8 bytes per element; built once with numpy's SIMD sort (~5 s per 100M elements).
    """

    def __init__(self, mags: np.ndarray) -> None:
        keys = mags.view(np.int32).astype(np.int64)
        keys <<= 32
        step = 1 << 24
        for start in range(0, keys.size, step):  # a chunked arange: no second n-sized temporary
            keys[start : start + step] |= np.arange(start, min(keys.size, start + step), dtype=np.int64)
        keys.sort()
        self.keys = keys
        self.total = float(self.values(0, keys.size).sum(dtype=np.float64))

    def values(self, lo: int, hi: int) -> np.ndarray:
        """The sorted magnitudes at positions ``lo .. hi - 1`` (decoded)."""
        return (self.keys[lo:hi] >> 32).astype(np.int32).view(np.float32)

    def count_below(self, value: float, inclusive: bool) -> int:
        """How many magnitudes are below ``value`` (or equal to it, when ``inclusive``)."""
        bits = int(np.float32(value).view(np.int32))
        return int(np.searchsorted(self.keys, ((bits + 1) << 32) if inclusive else (bits << 32), "left"))

    def index_at(self, pos: int) -> int:
        """The flat index of the element at ascending position ``pos``."""
        return int(self.keys[pos] & 0xFFFFFFFF)


def sorted_keys(inputs: TensorInputs, i: int) -> SortedKeys | None:
    """The cached sorted keys of model ``i``, when the merger reuses inputs and |d| is float32."""
    if not inputs.reuse or inputs.compute_dtype != torch.float32 or inputs.tensors[i].numel() >= 1 << 32:
        return None
    return cached(inputs, f"sorted_keys:{inputs.base_index}:{i}", lambda: SortedKeys(abs_numpy(inputs, i)))


def _order_stats(inputs: TensorInputs, i: int, lo: int, hi: int, want_l1: bool) -> _Stats:
    keyed = sorted_keys(inputs, i)
    if keyed is not None:
        vals = (float(keyed.values(lo, lo + 1)[0]), float(keyed.values(hi, hi + 1)[0]))
        below = tuple(keyed.count_below(v, False) for v in vals)
        upto = tuple(keyed.count_below(v, True) for v in vals)
        kept = float(keyed.values(lo, hi + 1).sum(dtype=np.float64)) if want_l1 else 0.0
        return _Stats(vals, below, upto, keyed.total, kept)
    if inputs.reuse:
        key = f"sorted_abs:{inputs.base_index}:{i}"
        if key not in inputs.cache:
            values = np.sort(abs_numpy(inputs, i))
            inputs.cache[key] = (values, float(values.sum(dtype=np.float64)))
        values, total = inputs.cache[key]
        vals = (values[lo], values[hi])
        below = tuple(int(np.searchsorted(values, v, "left")) for v in vals)
        upto = tuple(int(np.searchsorted(values, v, "right")) for v in vals)
        kept = float(values[lo : hi + 1].sum(dtype=np.float64)) if want_l1 else 0.0
        return _Stats((float(vals[0]), float(vals[1])), below, upto, total, kept)
    mags = abs_numpy(inputs, i)
    mags.partition(sorted({lo, hi}))  # in place: positions lo and hi hold their order statistics
    vals = (mags[lo], mags[hi])
    below = tuple(int(np.count_nonzero(mags < v)) for v in vals)
    upto = tuple(int(np.count_nonzero(mags <= v)) for v in vals)
    total = float(mags.sum(dtype=np.float64)) if want_l1 else 0.0
    kept = float(mags[lo : hi + 1].sum(dtype=np.float64)) if want_l1 else 0.0
    return _Stats((float(vals[0]), float(vals[1])), below, upto, total, kept)


def _cut(inputs: TensorInputs, i: int, value: float, side: str, first_kept: bool, quota: int, ties: int) -> Cut:
    """A cut whose first ``quota`` of the ``ties`` elements equal to ``value`` get the first treatment."""
    n = inputs.tensors[i].numel()
    if quota <= 0:
        split = 0
    elif quota >= ties:
        split = n
    else:
        split = _tie_split(inputs, i, value, quota, ties)
    exact, below = value, _below(value, inputs.compute_dtype)
    keep, drop = (below, exact) if side == "lo" else (exact, below)
    return Cut(value, side, first_kept, split, (keep, drop) if first_kept else (drop, keep))


def _tie_split(inputs: TensorInputs, i: int, value: float, quota: int, ties: int) -> int:
    """The flat index just after the ``quota``-th element (in index order) with ``|d| == value``.

    Scanned in blocks from the nearer end, stopping at the answer (numpy on CPU: its compares
    are much faster than torch's boolean kernels here).
    """
    keyed = sorted_keys(inputs, i)
    if keyed is not None:  # ties at ``value`` sit together in the sorted keys, in index order
        return keyed.index_at(keyed.count_below(value, False) + quota - 1) + 1
    x, b, cd = flat(inputs.tensors[i]), flat(inputs.base), inputs.compute_dtype
    n, block, seen = x.numel(), 1 << 20, 0
    use_numpy = x.device.type == "cpu" and cd in NUMPY_DTYPES
    backward = quota > ties // 2
    want = ties - quota if backward else quota  # from the end: the first of the last ``ties - quota``
    starts = range(0, n, block)
    for start in reversed(starts) if backward else starts:
        xs, bs = x[start : start + block].to(cd), b[start : start + block].to(cd)
        if use_numpy:
            mags = np.subtract(xs.numpy(), bs.numpy())
            equal = np.abs(mags, out=mags) == value
            count = int(np.count_nonzero(equal))
        else:
            equal = (xs - bs).abs_() == value
            count = int(equal.sum())
        if seen + count >= want:
            hits = np.flatnonzero(equal) if use_numpy else torch.nonzero(equal).flatten().cpu().numpy()
            if backward:
                return start + int(hits[count - (want - seen)])
            return start + int(hits[want - seen - 1]) + 1
        seen += count
    return n


def magnitude_plan(inputs: TensorInputs, i: int, density: float, rescale: bool) -> Plan:
    """TIES' plan for model ``i``: keep the ``max(1, int(density * n))`` largest ``|d|``."""
    n = inputs.tensors[i].numel()
    if density <= 0 or n == 0:
        return Plan("zero")
    k = max(1, int(density * n))
    pos = n - k  # ascending position of the k-th largest
    st = _order_stats(inputs, i, pos, n - 1, rescale)
    value = st.values[0]
    if value <= 0:
        return Plan("full")  # every non-zero element is kept
    ties = st.upto[0] - st.below[0]
    plan = Plan("band", [_cut(inputs, i, value, "lo", True, st.upto[0] - pos, ties)])
    if rescale:
        plan.scale = l1_scale(st.l1_total, st.l1_kept)
    return plan


def outliers_plan(inputs: TensorInputs, i: int, density: float, gamma: float, rescale: bool) -> Plan:
    """Breadcrumbs' plan for model ``i``: drop the largest ``gamma`` fraction of ``|d|``, keep
    the next ``int(density * n)``."""
    n = inputs.tensors[i].numel()
    keep = int(density * n)
    if keep <= 0:
        return Plan("zero")
    n_bot = max(0, n - keep - int(gamma * n))
    end = n_bot + keep  # kept: ascending positions n_bot .. end - 1
    st = _order_stats(inputs, i, n_bot, end - 1, rescale)
    lo, hi = st.values
    if hi <= 0:
        return Plan("zero")  # everything kept is 0
    plan = Plan("band")
    if n_bot > 0 and lo > 0:
        plan.cuts.append(_cut(inputs, i, lo, "lo", False, n_bot - st.below[0], st.upto[0] - st.below[0]))
    if end < n:
        plan.cuts.append(_cut(inputs, i, hi, "hi", True, end - st.below[1], st.upto[1] - st.below[1]))
    if rescale:
        plan.scale = l1_scale(st.l1_total, st.l1_kept)
    return plan


def _below(value: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` number below ``value`` (so ``|d| > it`` means ``|d| >= value``)."""
    v = torch.tensor(value, dtype=dtype)
    return float(torch.nextafter(v, torch.zeros((), dtype=dtype)))
