"""DELLA's MAGPRUNE mask (mergekit's ``della`` / ``della_linear``), made cheap to repeat.

mergekit keeps each element of a task vector ``d`` with probability
``p = density - epsilon + 2 * epsilon * r``, ``r`` the rank of ``|d|`` within its row scaled to
[0, 1].  Here an element with the uniform 16-bit draw ``u`` (:func:`~merge_core.kernels.random_fields.random_field`) is kept
when ``u - c <= A``, with ``c = r * b``, ``b = 2 * epsilon * 65536`` and
``A = ceil((density - epsilon) * 65536 - 32768) - 1``, in the compute dtype: ``P(keep) = p`` to
within 1/65536.  Every path -- one-shot, in-memory, eager, fused -- decides by these numbers
(the fused general form computes ``c`` as ``k * (b / (L-1))``, which may round differently in
the last bit: only an element exactly on its threshold can be decided otherwise).

Repeated merges (the in-memory merger) take one of two forms per model and tensor:

* **keyed**, while the slope ``b`` stays what it was on the previous call (a fixed epsilon: any
  recipe, and evolve genomes while a density stays in [0.3, 0.7]): rank and draw fold into one
  16-bit key per element, ``q = ceil(u - c)``, kept when ``q <= A``.  That is a DARE mask on the
  key field (a ``random`` plan with ``field="della_keys"``): one compare, fused kernels read two
  models' keys from one int32, and the rescale's kept L1 is a lookup in the cumulative ``|d|``
  per key value.  2 bytes per element and model are kept between candidates.
* **general**, from the first call that brings another slope (epsilon derived from a changing
  density): the draws and ranks (fused: packed in one int32 per model) and the rank-group lookup
  :class:`DellaLookup` for the kept L1 (10 bytes per element and model).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from merge_core.kernels import native
from merge_core.kernels.caches import cached, cached_for_seed, drop
from merge_core.kernels.chunking import flat
from merge_core.kernels.inputs import TensorInputs
from merge_core.kernels.plans import Plan
from merge_core.kernels.random_fields import cumulative_l1, random_field
from merge_core.kernels.task_vectors import NUMPY_DTYPES, abs_numpy, deltas, l1_scale

KEYS = "della_keys"


def plan(inputs: TensorInputs, i: int, density: float, epsilon: float, rescale: bool, seed: int) -> Plan:
    """Model ``i``'s DELLA plan (``0 < density - epsilon`` and ``density + epsilon < 1`` checked
    by the caller), keyed when :func:`keys` applies."""
    a = math.ceil((density - epsilon) * 65536 - 32768) - 1
    b = 2 * epsilon * 65536
    version = _keyed_version(inputs, i, seed, b)
    if version is not None:
        if a >= 32767:
            return Plan("full")  # every key is <= 32767
        keyed = Plan("random", thr=float(a + 1), field=KEYS, version=version)  # kept: q < a + 1
        if rescale:
            cum = cumulative_l1(inputs, i, KEYS, version, lambda: keys(inputs, i, version))
            keyed.scale = l1_scale(float(cum[-1]), float(cum[a + 32768]))
        return keyed
    general = Plan("della", a=float(a), b=b, version=seed)
    lookup = della_lookup(inputs, i, seed) if rescale else None
    if lookup is not None:
        general.scale = l1_scale(lookup.total, lookup.kept(general.a, general.b))
    elif rescale:
        general.l1_before = cached(inputs, f"l1:{inputs.base_index}:{i}",
                                   lambda: float(abs_numpy(inputs, i).sum(dtype=np.float64)))
    return general


def _keyed_version(inputs: TensorInputs, i: int, seed: int, b: float) -> tuple[int, float] | None:
    """``(seed, b)`` when model ``i`` may use the keyed form for this call, else None.

    Keyed while every call (of this seed) brings the same slope; the first other slope switches
    the tensor to the general form for good and frees the key field."""
    if not inputs.reuse:
        return None  # one-shot: building keys would cost more than the general pass
    tag = f"della_slope:{inputs.base_index}:{i}"
    seen = inputs.cache.get(tag)
    if seen is None or seen[0] != seed:
        inputs.cache[tag] = (seed, b)
        return seed, b
    if seen[1] == b:
        return seed, b
    if seen[1] is not None:
        inputs.cache[tag] = (seed, None)
        drop(inputs, lambda key: _derived_from_keys(key, i))
    return None


def _derived_from_keys(key: str, i: int) -> bool:
    """Whether cache entry ``key`` is model ``i``'s key field or was made from it (fused copies
    and pairs: ``random_fields.cumulative_l1``, ``fused._field32``, ``fused._pair``)."""
    parts = key.split(":")
    return len(parts) >= 3 and parts[1] == KEYS and str(i) in parts[2:] or key == f"{KEYS}:{i}"


def keys(inputs: TensorInputs, i: int, version: tuple[int, float]) -> torch.Tensor:
    """Model ``i``'s key field ``clamp(ceil(u - rank * b), int16)`` for ``version = (seed, b)``;
    cached.  Its draws and ranks are dropped once it exists (2 bytes per element kept instead of
    6; rebuilt if the general form is ever needed)."""
    seed, b = version

    def build() -> torch.Tensor:
        field = random_field(inputs, i, seed)
        x = field.to(inputs.compute_dtype).sub_(rank_norm(inputs, i) * b)  # as Masker computes u - c
        q = x.ceil_().clamp_(-32768, 32767).to(torch.int16)  # below -32768: kept whatever A is
        drop(inputs, lambda key: key in (f"draws:{i}", f"della_rank:{inputs.base_index}:{i}"))
        return q

    return cached_for_seed(inputs, f"{KEYS}:{i}", version, build)


def mask_chunk(u: torch.Tensor, ranks: torch.Tensor, plan: Plan, scratch: torch.Tensor) -> torch.Tensor:
    """The general form's 0/1 mask of one chunk, into ``u`` (the chunk's draws as floats):
    ``clamp(A + 1 - ceil(u - ranks * b), 0, 1)``."""
    torch.mul(ranks, plan.b, out=scratch)
    return u.sub_(scratch).ceil_().neg_().add_(plan.a + 1).clamp_(0, 1)


def rank_norm(inputs: TensorInputs, i: int) -> torch.Tensor:
    """DELLA's per-element rank of ``|d|`` within its row, scaled to [0, 1]; flat, cached.

    Rows are along dim 1 (a 1-D tensor is one row), as in mergekit; equal magnitudes get
    distinct ranks in index order (a stable sort: mergekit's order is arbitrary; ours is the
    same on every device and machine).  A row of one element gets 0.5 (mergekit would fail on it).
    """
    return cached(inputs, f"della_rank:{inputs.base_index}:{i}", lambda: _rank_norm(inputs, i))


def _index_order(rows: np.ndarray) -> np.ndarray:
    """Each row's argsort of non-negative magnitudes, equal values in index order.

    For float32 (the usual compute dtype) one unstable sort of ``bits << 32 | column`` keys: the
    bits of a non-negative float order as the float does, the column breaks ties, and the keys
    are distinct, so the order is the stable one at the speed of numpy's vectorised sort (about
    1.7x faster than ``kind="stable"``)."""
    if rows.dtype != np.float32:
        return np.argsort(rows, axis=1, kind="stable")
    keys = (rows.view(np.int32).astype(np.int64) << 32) | np.arange(rows.shape[1], dtype=np.int64)
    keys.sort(axis=1)
    return keys & 0xFFFFFFFF


def _rank_norm(inputs: TensorInputs, i: int) -> torch.Tensor:
    mags = deltas(inputs, i).abs_()
    if mags.dim() < 2:  # a 1-D tensor is one row; a scalar (Apertus's xIELU beta) a row of one
        mags = mags.reshape(1, -1)
    moved = mags.movedim(1, -1)
    length = moved.shape[-1]
    rows = moved.reshape(-1, length)
    ranks = torch.empty(rows.shape, dtype=inputs.compute_dtype, device=rows.device)
    if length == 1:
        ranks.fill_(0.5)
    else:
        positions = torch.arange(length, dtype=ranks.dtype, device=rows.device) / (length - 1)
        block = max(1, (1 << 22) // length)
        for start in range(0, rows.shape[0], block):
            part = rows[start : start + block]
            if part.device.type == "cpu":  # numpy's sorts are faster than torch's here
                src = part if part.dtype in NUMPY_DTYPES else part.float()
                order = torch.from_numpy(_index_order(src.contiguous().numpy()))
            else:
                order = torch.argsort(part, dim=1, stable=True)
            ranks[start : start + block].scatter_(1, order, positions.expand_as(order))
    return flat(ranks.reshape(moved.shape).movedim(-1, 1).contiguous())


class DellaLookup:
    """The L1 norm any general-form DELLA mask of one 2-D tensor keeps, by lookup.

    In each row the element of rank ``k`` is kept when its draw is at most
    ``T_k = max{u : u - c_k <= A}`` (``c_k = b * k / (L-1)``, float32 as in :func:`mask_chunk`):
    one threshold per rank.  Grouping the elements by rank (one per row), with their draws sorted
    and the running sum of ``|d|`` in that order, a candidate's kept L1 is ``L`` binary searches
    instead of a pass over the tensors.  6 bytes per element (int16 draws, float32 running sums
    within a rank group).  Built once per (model, seed) by the in-memory merger.
    """

    def __init__(self, ranks: torch.Tensor, mags: torch.Tensor, draws: torch.Tensor) -> None:
        rows, length = ranks.shape
        self.length = length
        rank_index = torch.round(ranks * (length - 1)).to(torch.int64)
        order = torch.empty_like(rank_index)  # order[r, k]: the column of row r's rank-k element
        order.scatter_(1, rank_index, torch.arange(length).expand(rows, length))
        del rank_index
        by_rank = torch.gather(draws, 1, order).T.contiguous()  # [L, R]: one rank per row
        sorted_draws, perm = torch.sort(by_rank, dim=1, stable=True)
        del by_rank
        mags_by_rank = torch.gather(mags, 1, order).T.contiguous()
        del order
        # cum[k, c]: the |d| of rank k's c elements with the smallest draws (cum[k, 0] = 0)
        self.cum = torch.zeros((length, rows + 1), dtype=torch.float32)
        self.cum[:, 1:] = torch.gather(mags_by_rank, 1, perm).to(torch.float64).cumsum_(1)
        self.draws = sorted_draws
        self.fences = sorted_draws[:, :: native.FENCE].contiguous()  # for the C lookup's first level
        self.total = float(mags_by_rank.sum(dtype=torch.float64))
        self.positions = torch.arange(length, dtype=torch.float32) / (length - 1)  # = rank_norm's

    def kept(self, a: float, b: float) -> float:
        """Sum of ``|d|`` where ``draw - rank * b <= a`` (``a`` an integer), the numbers rounded
        exactly as :func:`mask_chunk` rounds them."""
        fast = native.della_kept(self.draws, self.fences, self.cum, self.positions, a, b)
        if fast is not None:
            return fast
        last = self.thresholds(a, b).clamp_(max=32767).to(torch.int16)
        counts = torch.searchsorted(self.draws, last.view(-1, 1), right=True)
        return float(torch.gather(self.cum, 1, counts).sum(dtype=torch.float64))

    def thresholds(self, a: float, b: float) -> torch.Tensor:
        """``T_k`` per rank (float32, integer values): ``a + floor(c_k)``, moved by one where the
        float32 rounding of ``u - c_k`` says otherwise (>= -32768 since ``a`` >= -32768, c >= 0)."""
        c = torch.mul(self.positions, b)
        t = c.floor().add_(a)
        t += ((t + 1) - c <= a).float()
        t -= (t - c > a).float()
        return t


def row_length(ref: torch.Tensor) -> int | None:
    """The length of the rows DELLA ranks within (dim 1; a vector is one row) when the rank
    indices fit in 16 bits and a row has 2 or more elements (the lookup and the fused packing
    need both); else None."""
    length = ref.shape[1] if ref.dim() == 2 else ref.numel() if ref.dim() == 1 else 0
    return length if 2 <= length <= 65536 else None


def della_lookup(inputs: TensorInputs, i: int, seed: int) -> DellaLookup | None:
    """Model ``i``'s cached :class:`DellaLookup` for ``seed``; None where it does not apply
    (one-shot merges, non-CPU or non-float32 math, tensors of more than 2 dimensions, rows
    outside :func:`row_length`)."""
    ref = inputs.tensors[i]
    length = row_length(ref)
    if not inputs.reuse or ref.device.type != "cpu" or inputs.compute_dtype != torch.float32 or length is None:
        return None
    shape = (-1, length)  # a vector is one row, as in rank_norm
    return cached_for_seed(inputs, f"della_l1:{inputs.base_index}:{i}", seed, lambda: DellaLookup(
        rank_norm(inputs, i).view(shape), deltas(inputs, i).abs_().view(shape),
        random_field(inputs, i, seed).view(shape)))
