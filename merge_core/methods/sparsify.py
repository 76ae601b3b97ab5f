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

Magnitude methods: a plan is one or two *cuts* (a threshold magnitude and which side is kept),
applied per chunk with ``hardshrink``.  The thresholds come from order statistics of ``|d|``:
one-shot merges (``TensorInputs.reuse`` False) partition a copy (numpy's SIMD introselect, no
sort); the in-memory merger caches ``|d|`` per model sorted with its flat index as tie-breaker
(8 bytes per element, :class:`_SortedKeys`), so any density's threshold and the index where its
ties split are binary searches.  Elements whose magnitude equals a
threshold (frequent with bf16 checkpoints) are kept in index order, as a *stable* sort in
mergekit's direction would keep them; mergekit's own unstable ``argsort`` picks an
implementation-defined subset of those equal elements instead.  The number kept, the kept L1
and every element with another magnitude are identical to mergekit.

Random methods: each model gets one uniform 16-bit field per call, drawn whole from a stream
seeded by ``(seed drawn from the caller's generator, model index)`` (numpy SFC64 on CPU), and
an element is kept when its draw is below the keep probability (a multiple of 1/65536).  The
in-memory merger caches the field (2 bytes per element; the planner's seeds do not change
between candidates) and, for DARE's rescale, the L1 of ``|d|`` per draw value, so a
candidate's mask is one compare and its rescale a lookup.  DELLA (its rank-dependent
probability) lives in :mod:`~merge_core.methods.della`; repeated merges with a fixed epsilon
turn it into the same kind of compare on a field of per-element keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from merge_core.methods.base import MethodError, TensorInputs
from merge_core.methods.linear import flat

RESCALE_EPS = 1e-7  # mergekit leaves the tensor unscaled when either L1 norm is below this
_NUMPY_DTYPES = (torch.float32, torch.float64)


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
    ``b * rank`` is <= ``a``; see :mod:`~merge_core.methods.della`).
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


def delta_chunk(x: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``x - base`` into ``out`` (``base`` already in ``out``'s dtype)."""
    if x.dtype == out.dtype:
        return torch.sub(x, base, out=out)
    out.copy_(x)
    return out.sub_(base)


def _deltas(inputs: TensorInputs, i: int) -> torch.Tensor:
    cd = inputs.compute_dtype
    return inputs.tensors[i].to(cd) - inputs.base.to(cd)


def _abs_numpy(inputs: TensorInputs, i: int) -> np.ndarray:
    """``|model_i - base|`` as a flat numpy array (float32 unless the compute dtype is float64)."""
    mags = flat(_deltas(inputs, i)).abs_()
    if mags.dtype not in _NUMPY_DTYPES:
        mags = mags.float()  # bf16/fp16 magnitudes are exact in float32
    return mags.cpu().numpy()


def _cached(inputs: TensorInputs, key: str, build):
    """``build()``, kept in ``inputs.cache`` (one-shot callers clear it after the call)."""
    if key not in inputs.cache:
        inputs.cache[key] = build()
    return inputs.cache[key]


def cached_for_seed(inputs: TensorInputs, key: str, seed: int, build):
    """``build()``, kept in ``inputs.cache`` under ``key`` for as long as calls pass the same
    ``seed`` (random draws and what is derived from them)."""
    hit = inputs.cache.get(key)
    if hit is None or hit[0] != seed:
        hit = inputs.cache[key] = (seed, build())
    return hit[1]


def drop(inputs: TensorInputs, match: Callable[[str], bool]) -> None:
    """Forget the cached entries whose key ``match``es (a packed or derived form replaces them;
    they are rebuilt on demand)."""
    for key in [k for k in inputs.cache if match(k)]:
        del inputs.cache[key]


@dataclass
class _Stats:
    """Order statistics of ``|d|`` at two ascending-sort positions ``lo <= hi``."""

    values: tuple[float, float]
    below: tuple[int, int]  # elements strictly smaller than each value
    upto: tuple[int, int]  # elements smaller or equal
    l1_total: float
    l1_kept: float  # sum of the ascending-sorted magnitudes at positions lo..hi


class _SortedKeys:
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
        bits = int(np.float32(value).view(np.int32))
        return int(np.searchsorted(self.keys, ((bits + 1) << 32) if inclusive else (bits << 32), "left"))

    def index_at(self, pos: int) -> int:
        return int(self.keys[pos] & 0xFFFFFFFF)


def _sorted_keys(inputs: TensorInputs, i: int) -> _SortedKeys | None:
    """The cached sorted keys of model ``i``, when the merger reuses inputs and |d| is float32."""
    if not inputs.reuse or inputs.compute_dtype != torch.float32 or inputs.tensors[i].numel() >= 1 << 32:
        return None
    return _cached(inputs, f"sorted_keys:{inputs.base_index}:{i}", lambda: _SortedKeys(_abs_numpy(inputs, i)))


def _order_stats(inputs: TensorInputs, i: int, lo: int, hi: int, want_l1: bool) -> _Stats:
    keyed = _sorted_keys(inputs, i)
    if keyed is not None:
        vals = (float(keyed.values(lo, lo + 1)[0]), float(keyed.values(hi, hi + 1)[0]))
        below = tuple(keyed.count_below(v, False) for v in vals)
        upto = tuple(keyed.count_below(v, True) for v in vals)
        kept = float(keyed.values(lo, hi + 1).sum(dtype=np.float64)) if want_l1 else 0.0
        return _Stats(vals, below, upto, keyed.total, kept)
    if inputs.reuse:
        key = f"sorted_abs:{inputs.base_index}:{i}"
        if key not in inputs.cache:
            values = np.sort(_abs_numpy(inputs, i))
            inputs.cache[key] = (values, float(values.sum(dtype=np.float64)))
        values, total = inputs.cache[key]
        vals = (values[lo], values[hi])
        below = tuple(int(np.searchsorted(values, v, "left")) for v in vals)
        upto = tuple(int(np.searchsorted(values, v, "right")) for v in vals)
        kept = float(values[lo : hi + 1].sum(dtype=np.float64)) if want_l1 else 0.0
        return _Stats((float(vals[0]), float(vals[1])), below, upto, total, kept)
    mags = _abs_numpy(inputs, i)
    mags.partition(sorted({lo, hi}))  # in place: positions lo and hi hold their order statistics
    vals = (mags[lo], mags[hi])
    below = tuple(int(np.count_nonzero(mags < v)) for v in vals)
    upto = tuple(int(np.count_nonzero(mags <= v)) for v in vals)
    total = float(mags.sum(dtype=np.float64)) if want_l1 else 0.0
    kept = float(mags[lo : hi + 1].sum(dtype=np.float64)) if want_l1 else 0.0
    return _Stats((float(vals[0]), float(vals[1])), below, upto, total, kept)


def _l1_scale(before: float, after: float) -> float:
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return 1.0
    return before / after


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
    keyed = _sorted_keys(inputs, i)
    if keyed is not None:  # ties at ``value`` sit together in the sorted keys, in index order
        return keyed.index_at(keyed.count_below(value, False) + quota - 1) + 1
    x, b, cd = flat(inputs.tensors[i]), flat(inputs.base), inputs.compute_dtype
    n, block, seen = x.numel(), 1 << 20, 0
    use_numpy = x.device.type == "cpu" and cd in _NUMPY_DTYPES
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


def _magnitude_plan(inputs: TensorInputs, i: int, density: float, rescale: bool) -> Plan:
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
        plan.scale = _l1_scale(st.l1_total, st.l1_kept)
    return plan


def _outliers_plan(inputs: TensorInputs, i: int, density: float, gamma: float, rescale: bool) -> Plan:
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
        plan.scale = _l1_scale(st.l1_total, st.l1_kept)
    return plan


def random_field(inputs: TensorInputs, i: int, seed: int) -> torch.Tensor:
    """Model ``i``'s uniform int16 draws for one call (flat, on the tensors' device); cached per seed."""
    return cached_for_seed(inputs, f"draws:{i}", seed, lambda: _draw_field(inputs.tensors[i], i, seed))


def _draw_field(ref: torch.Tensor, i: int, seed: int) -> torch.Tensor:
    n = ref.numel()
    if ref.device.type == "cpu":
        bits = np.random.SFC64(np.random.SeedSequence([seed, i]))
        return torch.from_numpy(bits.random_raw((n + 3) // 4)).view(torch.int16)[:n]
    gen = torch.Generator(device=ref.device)
    gen.manual_seed((seed * 1_000_003 + i) % (1 << 63))
    return torch.randint(-32768, 32768, (n,), dtype=torch.int16, device=ref.device, generator=gen)


def field16(inputs: TensorInputs, i: int, plan: Plan) -> torch.Tensor:
    """The int16 field a ``random`` plan of model ``i`` compares with its threshold (cached)."""
    if plan.field == "draws":
        return random_field(inputs, i, plan.version)
    from merge_core.methods import della

    return della.keys(inputs, i, plan.version)


def field_l1(inputs: TensorInputs, i: int, plan: Plan) -> np.ndarray:
    """Cumulative ``sum |d|`` over the values of ``plan``'s field (float64, 65536 bins, value
    -32768 first): the L1 that keeping the values below any threshold keeps."""

    def build() -> np.ndarray:
        values = field16(inputs, i, plan).cpu().numpy().view(np.uint16) ^ np.uint16(0x8000)
        return np.cumsum(np.bincount(values, weights=_abs_numpy(inputs, i), minlength=65536))

    return cached_for_seed(inputs, f"l1:{plan.field}:{i}", plan.version, build)


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
        return _magnitude_plan(inputs, i, density, rescale)
    if method == "magnitude_outliers":
        return _outliers_plan(inputs, i, density, gamma, rescale)
    if method == "random":
        thr = round(density * 65536) if density > 0 else 0
        if thr >= 65536:
            return Plan("full")
        if thr <= 0:
            return Plan("zero")
        plan = Plan("random", thr=float(thr - 32768), version=seed)
        if rescale:
            cum = field_l1(inputs, i, plan)
            plan.scale = _l1_scale(float(cum[-1]), float(cum[thr - 1]))
        return plan
    if method == "della_magprune":
        if density <= 0:
            return Plan("zero")
        if density + epsilon >= 1 or density - epsilon <= 0:
            raise MethodError(
                f"model {i}: density {density} +/- epsilon {epsilon} must stay inside (0, 1)"
            )
        from merge_core.methods import della

        return della.plan(inputs, i, density, epsilon, rescale, seed)
    raise ValueError(f"unknown sparsification {method!r}")


def draw_seed(generator: torch.Generator | None, name: str) -> int:
    """One 62-bit seed from the caller's generator (the random methods' only use of it)."""
    if generator is None:
        raise MethodError(f"{name}: a randomized method needs a generator (seed)")
    return int(torch.randint(0, 1 << 62, (1,), generator=generator, device=generator.device))


def _below(value: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` number below ``value`` (so ``|d| > it`` means ``|d| >= value``)."""
    v = torch.tensor(value, dtype=dtype)
    return float(torch.nextafter(v, torch.zeros((), dtype=dtype)))


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
            from merge_core.methods import della

            u.copy_(random_field(self.inputs, i, plan.version)[start : start + n])
            della.mask_chunk(u, della.rank_norm(self.inputs, i)[start : start + n], plan, self._p[:n])
        d.mul_(u)
