"""Fused CPU kernels for the in-memory merger's hot loop (``torch.compile``, inductor backend).

The eager implementations (:func:`~merge_core.kernels.lincomb.lincomb` and the task-arithmetic
family's chunk loop) run 3-20 separate element-wise passes over cache-sized chunks; on a CPU that
caps a TIES merge at ~0.1 of memory-copy bandwidth.  Here the same per-element formula -- cast,
task vector, sparsification mask, weights, TIES election, ``base + lambda * mixed``, cast into
``out`` -- is traced once and compiled into one loop that reads every input once and writes the
output once (~1.0x copy bandwidth for task arithmetic, ~0.7x for TIES at 100M parameters).

Only the in-memory merger's repeated merges use it (``TensorInputs.reuse``; compiling costs a few
seconds per kernel shape, repaid after a few candidates), on CPU tensors of at least
``FUSE_MIN_ELEMENTS`` (smaller ones too when the model has such tensors: ``TensorInputs.fuse_small``).
Structure (methods, plan kinds, number of models, dtypes) is static and
specialised per kernel; every number (weights, thresholds, splits) enters as an element of one
small tensor, so new candidates reuse the compiled kernels, and every tensor is one kernel call.
Per-element side data is packed to cut memory traffic: 16-bit fields two models per int32 (DARE's
draws, and DELLA's keys while its epsilon stays fixed), or DELLA's draw and rank index in one
int32 per model (its general form, after epsilon changed).  When compiling fails (no C++ compiler, an
unsupported platform) the eager path is used from then on; ``MERGE_CORE_FUSED=0`` disables it.
Results equal the eager path's up to float rounding (a fused multiply-add may round once less).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch

from merge_core.errors import one_line
from merge_core.kernels.caches import cached_for_seed, drop
from merge_core.kernels.chunking import shares_memory
from merge_core.kernels.della import rank_norm, row_length
from merge_core.kernels.inputs import TensorInputs
from merge_core.kernels.random_fields import random_field
from merge_core.kernels.sparsify import field16

log = logging.getLogger(__name__)

FUSE_MIN_ELEMENTS = 1 << 18
_compiled: dict[str, Callable[..., Any]] = {}
_broken: list[str] = []  # why compiling failed, once


def usable(inputs: TensorInputs, out: Optional[torch.Tensor] = None, *, needs_out: bool = False) -> bool:
    """Whether fused kernels may read ``inputs`` (and write ``out``, when given or ``needs_out``)."""
    if _broken or os.environ.get("MERGE_CORE_FUSED", "1") == "0" or not inputs.reuse:
        return False
    ref = inputs.tensors[0]
    if ref.device.type != "cpu" or (ref.numel() < FUSE_MIN_ELEMENTS and not inputs.fuse_small):
        return False
    if not all(t.is_contiguous() for t in inputs.tensors):
        return False
    if out is None:
        return not needs_out
    if out.shape != ref.shape or not out.is_contiguous() or not out.dtype.is_floating_point:
        return False
    return not shares_memory(out, inputs.tensors)


def _kernel(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    compiled = _compiled.get(name)
    if compiled is None:
        import torch._dynamo

        # One kernel per structure (methods, plan kinds, model count, dtypes): more than the
        # default 8 variants per function in a long search with many genomes.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
        compiled = _compiled[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    return compiled


_FAILED = object()


def _call(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """The compiled ``fn``'s result; ``_FAILED`` (and the eager path from now on) when compiling fails."""
    try:
        with torch.no_grad():
            return _kernel(name, fn)(*args)
    except Exception as exc:  # compiler missing, backend error: merging must still work
        if not _broken:
            _broken.append(one_line(exc))
            log.warning("fused merge kernels unavailable (%s); using the eager path", _broken[0])
        return _FAILED


def _field32(inputs: TensorInputs, i: int, plan: Any) -> torch.Tensor:
    """The 16-bit field of model ``i``'s ``plan`` (random draws or DELLA keys) as int32, cached
    beside it: inductor does not vectorise int16 loads (a scalar loop runs ~8x slower), so an
    unpaired random plan costs the fused path 4 more bytes per element."""
    return cached_for_seed(inputs, f"f32:{plan.field}:{i}", plan.version,
                           lambda: field16(inputs, i, plan).to(torch.int32))


# --- linear combinations (linear, task_arithmetic without sparsification) -----------------------


def _lincomb_fn(out: torch.Tensor, xs: list[torch.Tensor], coefs: torch.Tensor, cd: torch.dtype) -> None:
    acc = xs[0].to(cd) * coefs[0].to(cd)
    for j, x in enumerate(xs[1:], start=1):
        acc = acc + x.to(cd) * coefs[j].to(cd)
    out.copy_(acc.to(out.dtype))


def lincomb(inputs: TensorInputs, terms: Sequence[tuple[int, float]], out: torch.Tensor) -> bool:
    """``out = sum(c * tensors[i])`` fused; False when the caller must use the eager path."""
    terms = [(i, c) for i, c in terms if c != 0.0]
    if not terms:
        return False
    xs = [inputs.tensors[i].view(-1) for i, _ in terms]
    coefs = torch.tensor([c for _, c in terms], dtype=inputs.compute_dtype)
    return _call("lincomb", _lincomb_fn, out.view(-1), xs, coefs, inputs.compute_dtype) is not _FAILED


# --- the task-arithmetic family: sparsify, weigh, (elect), add to the base -----------------------
#
# Every number of a call travels in ONE float tensor ``f`` (and the band cuts' split indices in one
# int64 tensor): building a 0-d tensor per number and guarding each argument cost ~0.5 ms per
# tensor, a third of a TIES merge at 500M parameters.  Positions in ``f`` follow from the static
# structure (``specs``): lambda, one coefficient and one weight per model, then per model its
# plan's numbers (band: two bounds per cut; random: threshold; della: a, slope; packed della:
# a, slope / (row length - 1)).


def _plan_numbers(spec: tuple) -> int:
    kind = spec[0]
    counts = {"random": 1, "random_lo": 1, "random_hi": 1, "della": 2, "della_packed": 2}
    return 2 * len(spec[1]) if kind == "band" else counts.get(kind, 0)


def _sparse_delta(d: torch.Tensor, spec: tuple, tensors: list, f: torch.Tensor, at: int,
                  splits: torch.Tensor, cut_at: int, cd: torch.dtype) -> torch.Tensor:
    """One model's sparsified task vector ``d``, as :class:`~merge_core.kernels.sparsify.Masker`
    makes it; its numbers start at ``f[at]``, its cuts' split indices at ``splits[cut_at]``."""
    kind = spec[0]
    if kind == "band":
        # A cut's bound changes at its split index (threshold ties kept in index order): picked
        # per element from the flat index, so a tensor is one kernel call, not one per segment.
        # Cuts whose split is 0 or n (no ties at the threshold) skip that compare.
        idx = torch.arange(d.numel(), dtype=torch.int32, device=d.device)
        for k, (side, split) in enumerate(spec[1]):
            lo, hi = f[at + 2 * k], f[at + 2 * k + 1]
            bound = (torch.where(idx < splits[cut_at + k], lo, hi) if split else lo).to(cd)
            big = d.abs() > bound  # hardshrink keeps |d| > bound
            d = torch.where(big, d, 0.0) if side == "lo" else torch.where(big, 0.0, d)
    elif kind == "random":
        d = d * (f[at].to(cd) - tensors[0].to(cd)).clamp(0, 1)
    elif kind == "random_lo":  # two models' draws in one int32, see _draw_pair: low half + 32768
        d = d * (f[at].to(cd) + 32768.0 - (tensors[0] & 0xFFFF).to(cd)).clamp(0, 1)
    elif kind == "random_hi":  # the high half, sign-extended by the arithmetic shift
        d = d * (f[at].to(cd) - (tensors[0] >> 16).to(cd)).clamp(0, 1)
    elif kind == "della":  # kept when draw - rank * b <= a (della.mask_chunk)
        field, rank = tensors
        d = torch.where(field.to(cd) - rank.to(cd) * f[at + 1].to(cd) <= f[at].to(cd), d, 0.0)
    elif kind == "della_packed":  # see _della_pack: draw << 16 | rank index
        packed = tensors[0]
        # rank * b as k * (b / (L-1)): one multiply fewer than the eager rounding of k / (L-1) * b,
        # which may differ in the last bit: only an element whose draw - rank * b is exactly at
        # the threshold can be decided otherwise.
        slope = (packed & 0xFFFF).to(cd) * f[at + 1].to(cd)
        d = torch.where((packed >> 16).to(cd) - slope <= f[at].to(cd), d, 0.0)
    return d


def _pick(agree: list[torch.Tensor], f: torch.Tensor, at: int, subset: int, cd: torch.dtype) -> torch.Tensor:
    """``f[at + S]`` where ``S`` is the bitmask of the models whose ``agree`` holds."""
    if not agree:
        return f[at + subset].to(cd)
    bit = 1 << (len(agree) - 1)  # the last model is the highest bit
    return torch.where(agree[-1], _pick(agree[:-1], f, at, subset | bit, cd), _pick(agree[:-1], f, at, subset, cd))


def _gta_fn(out: torch.Tensor, base: torch.Tensor, xs: list[torch.Tensor], specs: tuple, tensors: list,
            f: torch.Tensor, splits: torch.Tensor, consensus: bool, normalize: Optional[str],
            cd: torch.dtype) -> None:
    m = len(xs)
    b = base.to(cd)
    lam = f[0].to(cd)
    terms = []
    at, cut_at = 1 + 2 * m, 0
    for j, (x, spec, data) in enumerate(zip(xs, specs, tensors)):
        d = _sparse_delta(x.to(cd) - b, spec, data, f, at, splits, cut_at, cd)
        terms.append(d * f[1 + j].to(cd))
        at += _plan_numbers(spec)
        cut_at += len(spec[1]) if spec[0] == "band" else 0
    if not consensus:
        mixed = terms[0]
        for t in terms[1:]:
            mixed = mixed + t
        out.copy_((b + mixed).to(out.dtype))  # lambda is folded into the coefficients
        return
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    # TIES election: the sign of the sum wins (+ on ties); a term agrees when it is non-zero
    # with that sign.  Selecting terms (not multiplying by the sign and clamping, as the eager
    # path does) gives the same bits with fewer instructions, which matters once the index
    # compares above make the kernel compute-bound.
    positive = total >= 0
    agree = [torch.where(positive, t > 0, t < 0) for t in terms]
    mixed = torch.where(agree[0], terms[0], 0.0)
    for a, t in zip(agree[1:], terms[1:]):
        mixed = mixed + torch.where(a, t, 0.0)
    if normalize == "table":
        # 1 / (sum of the agreeing weights), picked from the 2^m subsets' reciprocals (1 for a
        # zero sum) by a tree of selections: a division per element made TIES compute-bound.
        mixed = mixed * _pick(agree, f, at, 0, cd)
    elif normalize == "divide":
        # the agreeing terms' weights summed; divide by 1 where it is 0 (as eager does)
        den = torch.where(agree[0], f[1 + m].to(cd), 0.0)
        for j, a in enumerate(agree[1:], start=1):
            den = den + torch.where(a, f[1 + m + j].to(cd), 0.0)
        mixed = mixed / torch.where(den == 0, 1.0, den)
    out.copy_((b + lam * mixed).to(out.dtype))


def _della_pack(inputs: TensorInputs, i: int, seed: int) -> Optional[torch.Tensor]:
    """Model ``i``'s DELLA draws and rank indices in one int32 per element (``draw << 16 | k``,
    the draw signed so an arithmetic shift recovers it), cached per seed, for DELLA's general
    form (see :mod:`~merge_core.kernels.della`); None unless the tensor is a vector or matrix
    with rows of 2 to 65536 elements (:func:`della.row_length <merge_core.kernels.della.row_length>`).

    The kernel then reads 4 bytes per element and model instead of 8 (int32 draws + float32
    ranks), and the cache drops the separate draws and ranks (the rescale's lookup is built by
    then): at 500M parameters that is the difference between fitting in 24 GB or not.
    """
    length = row_length(inputs.tensors[i])
    if length is None:
        return None

    def build() -> torch.Tensor:
        k = torch.round(rank_norm(inputs, i) * (length - 1)).to(torch.int32)
        packed = (random_field(inputs, i, seed).to(torch.int32) << 16).bitwise_or_(k)
        gone = {f"draws:{i}", f"f32:draws:{i}", f"della_rank:{inputs.base_index}:{i}"}
        drop(inputs, gone.__contains__)
        return packed

    return cached_for_seed(inputs, f"della_pack:{i}", seed, build)


def _pair(inputs: TensorInputs, i: int, j: int, plan_i: Any, plan_j: Any) -> torch.Tensor:
    """The 16-bit fields of two ``random`` plans (DARE draws or DELLA keys; both of one kind) in
    one int32 per element (``j``'s value << 16 | ``i``'s value + 32768), cached: the kernel reads
    4 bytes per element for both models instead of 4 each.  The separate fields are dropped from
    the cache (the rescale's cumulative L1 per value is built by then)."""
    field = plan_i.field

    def build() -> torch.Tensor:
        high = field16(inputs, j, plan_j).to(torch.int32) << 16
        pair = high.bitwise_or_(field16(inputs, i, plan_i).to(torch.int32) + 32768)
        # field16 caches each int16 field under "<field>:<model>", its int32 copy under "f32:..."
        drop(inputs, {f"{field}:{i}", f"{field}:{j}", f"f32:{field}:{i}", f"f32:{field}:{j}"}.__contains__)
        return pair

    return cached_for_seed(inputs, f"pair:{field}:{i}:{j}", (plan_i.version, plan_j.version), build)


def _plan_parts(inputs: TensorInputs, plan: Any, i: int) -> tuple[tuple, list, list[float], list[int]]:
    """What the kernel needs of model ``i``'s plan: its static structure (``spec``), the
    per-element tensors it reads, its numbers in ``f`` order and its cuts' split indices."""
    n = inputs.tensors[i].numel()
    if plan.kind == "band":
        values: list[float] = []
        for c in plan.cuts:  # a split at 0 or n: one bound everywhere, first in the pair
            values += c.bounds if 0 < c.split < n else [c.bounds[0 if c.split >= n else 1]] * 2
        spec = ("band", tuple((c.side, 0 < c.split < n) for c in plan.cuts))
        return spec, [], values, [min(max(c.split, 0), n) for c in plan.cuts]
    if plan.kind == "random":
        return ("random",), [_field32(inputs, i, plan)], [plan.thr], []
    if plan.kind == "della":
        packed = _della_pack(inputs, i, plan.version)
        if packed is not None:
            return ("della_packed",), [packed], [plan.a, plan.b / (row_length(inputs.tensors[i]) - 1)], []
        return ("della",), [_field32(inputs, i, plan), rank_norm(inputs, i)], [plan.a, plan.b], []
    return (plan.kind,), [], [], []


def task_arithmetic(
    inputs: TensorInputs, plans: dict[int, Any], active: list[int], coef: dict[int, float],
    weights: Optional[dict[int, float]], lam: float, consensus: bool, out: torch.Tensor,
) -> bool:
    """The fused form of ``GeneralizedTaskArithmetic._run`` (:mod:`merge_core.methods.task_arithmetic`);
    False when the caller must run eager."""
    if any(plans[i].kind not in ("full", "band", "random", "della") for i in active):
        return False
    numbers = [lam, *(coef[i] for i in active), *((weights or {}).get(i, 0.0) for i in active)]
    specs, tensors, splits = [], [], []
    randoms = [i for i in active if plans[i].kind == "random"]
    paired = {}  # random plans two by two: one int32 of draws (or DELLA keys) per element for both
    for i, j in zip(randoms[::2], randoms[1::2]):
        pair = _pair(inputs, i, j, plans[i], plans[j])
        paired[i], paired[j] = ("random_lo", pair), ("random_hi", pair)
    for i in active:
        if i in paired:
            kind, pair = paired[i]
            specs.append((kind,))
            tensors.append([pair])
            numbers.append(plans[i].thr)
            continue
        spec, data, values, cuts = _plan_parts(inputs, plans[i], i)
        specs.append(spec)
        tensors.append(data)
        numbers += values
        splits += cuts
    normalize = None
    if weights is not None:
        normalize = "divide"
        if consensus and len(active) <= 3:  # a table of 2^m reciprocals instead of a division
            normalize = "table"
            for subset in range(1 << len(active)):
                total = sum(weights[i] for k, i in enumerate(active) if subset >> k & 1)
                numbers.append(1.0 / total if total != 0 else 1.0)
    cd = inputs.compute_dtype
    f = torch.tensor(numbers, dtype=cd)
    split_t = torch.tensor(splits or [0], dtype=torch.int32)
    xs = [inputs.tensors[i].view(-1) for i in active]
    return _call("gta", _gta_fn, out.view(-1), inputs.base.view(-1), xs, tuple(specs), tensors, f, split_t,
                 consensus, normalize, cd) is not _FAILED


def _kept_l1_fn(base: torch.Tensor, x: torch.Tensor, spec: tuple, data: list, f: torch.Tensor,
                cd: torch.dtype) -> torch.Tensor:
    b = base.to(cd)
    no_cuts = torch.zeros(1, dtype=torch.int32)
    return _sparse_delta(x.to(cd) - b, spec, data, f, 0, no_cuts, 0, cd).abs().sum(dtype=torch.float64)


def kept_l1(inputs: TensorInputs, plans: dict[int, Any], todo: list[int]) -> Optional[dict[int, float]]:
    """L1 norm of what each random plan in ``todo`` keeps (the rescale's first pass), fused;
    None when the caller must measure it eagerly."""
    if any(plans[i].kind not in ("random", "della") for i in todo):
        return None
    cd = inputs.compute_dtype
    out: dict[int, float] = {}
    for i in todo:
        spec, data, values, _ = _plan_parts(inputs, plans[i], i)
        total = _call("kept_l1", _kept_l1_fn, inputs.base.view(-1), inputs.tensors[i].view(-1), spec, data,
                      torch.tensor(values, dtype=cd), cd)
        if total is _FAILED:
            return None
        out[i] = float(total)
    return out


# --- element-wise merges against a base: nearswap, ram / ramplus_tl ------------------------------


def _nearswap_fn(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, f: torch.Tensor, cd: torch.dtype) -> None:
    a, b = a.to(cd), b.to(cd)
    w = (f[0].to(cd) / (a - b).abs().clamp(min=1e-6)).clamp(0.0, 1.0)
    out.copy_((w * b + (1 - w) * a).to(out.dtype))


def nearswap(inputs: TensorInputs, base: int, other: int, t: float, out: torch.Tensor) -> bool:
    """nearswap's ``w b + (1 - w) a`` fused; False when the caller must use the eager path."""
    f = torch.tensor([t], dtype=torch.float64)
    args = (out.view(-1), inputs.tensors[base].view(-1), inputs.tensors[other].view(-1), f, inputs.compute_dtype)
    return _call("nearswap", _nearswap_fn, *args) is not _FAILED


def _ram_fn(out: torch.Tensor, base: torch.Tensor, xs: list[torch.Tensor], f: torch.Tensor, cd: torch.dtype) -> None:
    z = base.to(cd)
    tvs = [x.to(cd) - z for x in xs]
    changed = [(tv.abs() > f[0]).to(cd) for tv in tvs]
    count = changed[0]
    for c in changed[1:]:
        count = count + c
    divisor = count.clamp(min=1.0)
    acc = None
    for k, (tv, c) in enumerate(zip(tvs, changed)):
        kept = tv * c
        term = torch.where((count == 1.0) & (c > 0), kept * f[k + 1].to(cd), kept / divisor)
        acc = term if acc is None else acc + term
    out.copy_((z + acc).to(out.dtype))


def ram(inputs: TensorInputs, models: list[int], epsilon: float, scales: Sequence[float], out: torch.Tensor) -> bool:
    """RAM's merge (``scales`` multiply each model's lone changes: 1 for ram, RAM+'s factors)
    fused; False when the caller must use the eager path."""
    f = torch.tensor([epsilon, *scales], dtype=torch.float32).to(torch.float64)
    xs = [inputs.tensors[i].view(-1) for i in models]
    args = (out.view(-1), inputs.base.view(-1), xs, f, inputs.compute_dtype)
    return _call("ram", _ram_fn, *args) is not _FAILED
