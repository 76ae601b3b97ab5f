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

Speed: the magnitude methods cache the sorted ``|d|`` per model and its permutation
(param-independent; 8 bytes per element and model), so any density's threshold is an index
lookup and masking is one ``hardshrink`` per chunk; elements tied at a threshold that mergekit's
sort leaves out are zeroed by index.  DELLA caches
each element's normalised rank.  The random methods draw 16-bit integers per element from a
stream seeded by the caller's generator (one stream per model, consumed chunk by chunk, so the
result does not depend on ``out``); keep probabilities are thus multiples of 1/65536.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from merge_core.methods.base import MethodError, TensorInputs
from merge_core.methods.linear import chunks, flat

RESCALE_EPS = 1e-7  # mergekit leaves the tensor unscaled when either L1 norm is below this


@dataclass
class Plan:
    """How one model's task vector is sparsified for one call.

    ``kind``: ``full`` (untouched), ``zero`` (all dropped), ``band`` (keep ``lo < |d| <= hi``,
    each bound optional, then zero the ``drop`` indices), ``random`` (keep if a 16-bit draw < ``thr``), ``della`` (keep if the
    draw < ``ceil(a + b * rank_norm)``).  ``scale`` multiplies what is kept; ``l1_before`` is set
    when the random kinds still need their L1 rescale measured.
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    thr: float = 0.0
    a: float = 0.0
    b: float = 0.0
    scale: float = 1.0
    l1_before: float | None = None
    drop: torch.Tensor | None = None  # sorted flat indices tied at a threshold but not kept

    @property
    def random(self) -> bool:
        return self.kind in ("random", "della")


def delta_chunk(x: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``x - base`` into ``out`` (``base`` already in ``out``'s dtype)."""
    if x.dtype == out.dtype:
        return torch.sub(x, base, out=out)
    out.copy_(x)
    return out.sub_(base)


def _deltas(inputs: TensorInputs, i: int) -> torch.Tensor:
    cd = inputs.compute_dtype
    return inputs.tensors[i].to(cd) - inputs.base.to(cd)


def magnitude_order(inputs: TensorInputs, i: int, descending: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``|model_i - base|`` sorted (values, flat compute dtype) and the permutation that sorts it; cached.

    The permutation comes from the same call mergekit makes (``argsort(descending=True)`` for
    ``magnitude``, ``sort()`` for ``magnitude_outliers``), so elements tied at a threshold are
    kept or dropped as mergekit does (for float32 inputs).  Stored as int32 when it fits.
    """
    key = f"magnitude_order:{inputs.base_index}:{i}:{'desc' if descending else 'asc'}"
    if key not in inputs.cache:
        mags = flat(_deltas(inputs, i)).abs_()
        if descending:
            perm = torch.argsort(mags, descending=True)
            values = mags[perm]
        else:
            values, perm = torch.sort(mags)
        if mags.numel() < 2**31:
            perm = perm.to(torch.int32)
        inputs.cache[key] = (values, perm)
    return inputs.cache[key]


def _tie_end(values: torch.Tensor, start: int, value: float) -> int:
    """First position ``>= start`` whose value differs from ``value`` (``values`` sorted, run contiguous)."""
    lo, hi = start, values.numel()
    while lo < hi:
        mid = (lo + hi) // 2
        if float(values[mid]) == value:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _tie_start(values: torch.Tensor, stop: int, value: float) -> int:
    """First position of the run of ``value`` that ends just before ``stop``."""
    lo, hi = 0, stop
    while lo < hi:
        mid = (lo + hi) // 2
        if float(values[mid]) == value:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _drops(perm: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
    """Flat indices ``perm[start:stop]`` sorted, or None when empty."""
    if stop <= start:
        return None
    return torch.sort(perm[start:stop].to(torch.int64)).values


def _join(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return a if b is None else b
    return torch.sort(torch.cat([a, b])).values


def l1_norm(inputs: TensorInputs, i: int) -> float:
    """``sum |model_i - base|``, cached."""
    key = f"l1:{inputs.base_index}:{i}"
    if key not in inputs.cache:
        base, x = flat(inputs.base), flat(inputs.tensors[i])
        total = 0.0
        for start, stop in chunks(x.numel(), x.device):
            total += float(x[start:stop].to(torch.float64).sub_(base[start:stop]).abs_().sum())
        inputs.cache[key] = total
    return inputs.cache[key]


def rank_norm(inputs: TensorInputs, i: int) -> torch.Tensor:
    """DELLA's per-element rank of ``|d|`` within its row, scaled to [0, 1]; flat, cached.

    Rows are along dim 1 (a 1-D tensor is one row), as in mergekit.  A row of one element gets
    0.5 (mergekit would fail on it).
    """
    key = f"della_rank:{inputs.base_index}:{i}"
    if key in inputs.cache:
        return inputs.cache[key]
    mags = _deltas(inputs, i).abs_()
    if mags.dim() < 2:
        mags = mags.unsqueeze(0)
    moved = mags.movedim(1, -1)
    length = moved.shape[-1]
    rows = moved.reshape(-1, length)
    ranks = torch.empty_like(rows)
    if length == 1:
        ranks.fill_(0.5)
    else:
        positions = torch.arange(length, dtype=rows.dtype, device=rows.device) / (length - 1)
        block = max(1, (1 << 20) // length)
        for start in range(0, rows.shape[0], block):
            order = torch.argsort(rows[start : start + block], dim=1)
            ranks[start : start + block].scatter_(1, order, positions.expand_as(order))
    result = flat(ranks.reshape(moved.shape).movedim(-1, 1).contiguous())
    inputs.cache[key] = result
    return result


def _lower(value: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` number below ``value`` (so ``|d| > it`` means ``|d| >= value``)."""
    v = torch.tensor(value, dtype=dtype)
    return float(torch.nextafter(v, torch.zeros((), dtype=dtype)))


def _l1_scale(before: float, after: float) -> float:
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return 1.0
    return before / after


def make_plan(
    method: str,
    inputs: TensorInputs,
    i: int,
    density: float,
    rescale: bool,
    gamma: float = 0.0,
    epsilon: float = 0.0,
) -> Plan:
    """The sparsification of model ``i`` for ``density`` etc. (``method`` as in mergekit)."""
    if density >= 1:
        return Plan("full")
    n = inputs.tensors[i].numel()
    if method == "magnitude":
        if density <= 0 or n == 0:
            return Plan("zero")
        k = max(1, int(density * n))
        values, perm = magnitude_order(inputs, i, descending=True)
        lo = float(values[k - 1])
        plan = Plan("band")
        if lo > 0:
            plan.lo = _lower(lo, values.dtype)
            plan.drop = _drops(perm, k, _tie_end(values, k, lo))
        if rescale:
            plan.scale = _l1_scale(float(values.sum(dtype=torch.float64)),
                                   float(values[:k].sum(dtype=torch.float64)))
        return plan
    if method == "magnitude_outliers":
        keep = int(density * n)
        if keep <= 0:
            return Plan("zero")
        n_bot = max(0, n - keep - int(gamma * n))
        end = n_bot + keep
        values, perm = magnitude_order(inputs, i, descending=False)
        lo, hi = float(values[n_bot]), float(values[end - 1])
        plan = Plan("band")
        if lo > 0:
            plan.lo = _lower(lo, values.dtype)
            plan.drop = _drops(perm, _tie_start(values, n_bot, lo), n_bot)
        if end < n and hi > 0:
            plan.hi = hi
            plan.drop = _join(plan.drop, _drops(perm, end, _tie_end(values, end, hi)))
        if rescale:
            plan.scale = _l1_scale(float(values.sum(dtype=torch.float64)),
                                   float(values[n_bot:end].sum(dtype=torch.float64)))
        return plan
    if method == "random":
        if density <= 0:
            return Plan("zero")
        thr = round(density * 65536)
        if thr >= 65536:
            return Plan("full")
        if thr <= 0:
            return Plan("zero")
        return Plan("random", thr=float(thr - 32768), l1_before=l1_norm(inputs, i) if rescale else None)
    if method == "della_magprune":
        if density <= 0:
            return Plan("zero")
        if density + epsilon >= 1 or density - epsilon <= 0:
            raise MethodError(
                f"model {i}: density {density} +/- epsilon {epsilon} must stay inside (0, 1)"
            )
        return Plan(
            "della",
            a=(density - epsilon) * 65536 - 32768,
            b=2 * epsilon * 65536,
            l1_before=l1_norm(inputs, i) if rescale else None,
        )
    raise ValueError(f"unknown sparsification {method!r}")


class Rand16:
    """A reproducible stream of uniform int16 values for one model of one call.

    On CPU numpy's SFC64 (several times faster than torch's CPU generator); elsewhere a torch
    generator on the tensors' device.  Both are seeded from ``(seed, stream)`` only.
    """

    def __init__(self, seed: int, stream: int, device: torch.device) -> None:
        self.device = device
        if device.type == "cpu":
            self._bits = np.random.SFC64(np.random.SeedSequence([seed, stream]))
        else:
            self._gen = torch.Generator(device=device)
            self._gen.manual_seed((seed * 1_000_003 + stream) % (1 << 63))

    def next(self, n: int) -> torch.Tensor:
        """The next ``n`` values."""
        if self.device.type == "cpu":
            raw = self._bits.random_raw((n + 3) // 4)
            return torch.from_numpy(raw).view(torch.int16)[:n]
        return torch.randint(-32768, 32768, (n,), dtype=torch.int16, device=self.device, generator=self._gen)


def draw_seed(generator: torch.Generator | None, name: str) -> int:
    """One 62-bit seed from the caller's generator (the random methods' only use of it)."""
    if generator is None:
        raise MethodError(f"{name}: a randomized method needs a generator (seed)")
    return int(torch.randint(0, 1 << 62, (1,), generator=generator, device=generator.device))


class Masker:
    """Applies plans to chunks of task vectors in place, with scratch buffers reused across chunks."""

    def __init__(self, inputs: TensorInputs, step: int) -> None:
        dev, cd = inputs.tensors[0].device, inputs.compute_dtype
        self.inputs = inputs
        self._u = torch.empty(step, dtype=cd, device=dev)
        self._p = torch.empty(step, dtype=cd, device=dev)

    def apply(self, plan: Plan, i: int, d: torch.Tensor, start: int, stream: Rand16 | None) -> None:
        """Zero the dropped elements of chunk ``d`` (model ``i``, elements from ``start``)."""
        n = d.numel()
        if plan.kind == "full":
            return
        if plan.kind == "band":
            if plan.hi is not None:
                over = self._p[:n]
                torch.ops.aten.hardshrink.out(d, plan.hi, out=over)
                d.sub_(over)
            if plan.lo is not None:
                torch.ops.aten.hardshrink.out(d, plan.lo, out=d)
            if plan.drop is not None:
                first, last = torch.searchsorted(plan.drop, torch.tensor([start, start + n])).tolist()
                if last > first:
                    d.index_fill_(0, plan.drop[first:last] - start, 0.0)
            return
        u = self._u[:n]
        u.copy_(stream.next(n))
        if plan.kind == "random":
            u.neg_().add_(plan.thr)  # thr - draw >= 1 exactly when kept (integers)
        else:
            p = self._p[:n]
            torch.mul(rank_norm(self.inputs, i)[start : start + n], plan.b, out=p)
            p.add_(plan.a).ceil_()
            torch.sub(p, u, out=u)
        d.mul_(u.clamp_(0, 1))
