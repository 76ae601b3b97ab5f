"""Fused CPU kernels for the in-memory merger's hot loop (``torch.compile``, inductor backend).

The eager implementations (:func:`~merge_core.methods.linear.lincomb` and the task-arithmetic
family's chunk loop) run 3-20 separate element-wise passes over cache-sized chunks; on a CPU that
caps a TIES merge at ~0.1 of memory-copy bandwidth.  Here the same per-element formula -- cast,
task vector, sparsification mask, weights, TIES election, ``base + lambda * mixed``, cast into
``out`` -- is traced once and compiled into one loop that reads every input once and writes the
output once (~1.0x copy bandwidth for task arithmetic, ~0.7x for TIES at 100M parameters).

Only the in-memory merger's repeated merges use it (``TensorInputs.reuse``; compiling costs a few
seconds per kernel shape, repaid after a few candidates), on CPU tensors of at least
``FUSE_MIN_ELEMENTS``.  Structure (methods, plan kinds, number of models, dtypes) is static and
specialised per kernel; every number (weights, thresholds, splits) enters as a 0-d tensor, so
new candidates reuse the compiled kernels.  When compiling fails (no C++ compiler, an
unsupported platform) the eager path is used from then on; ``MERGE_CORE_FUSED=0`` disables it.
Results equal the eager path's up to float rounding (a fused multiply-add may round once less).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch

from merge_core.methods.base import TensorInputs
from merge_core.methods.linear import shares_memory

log = logging.getLogger(__name__)

FUSE_MIN_ELEMENTS = 1 << 20
_compiled: dict[str, Callable[..., Any]] = {}
_broken: list[str] = []  # why compiling failed, once


def usable(inputs: TensorInputs, out: Optional[torch.Tensor] = None, *, needs_out: bool = False) -> bool:
    """Whether fused kernels may read ``inputs`` (and write ``out``, when given or ``needs_out``)."""
    if _broken or os.environ.get("MERGE_CORE_FUSED", "1") == "0" or not inputs.reuse:
        return False
    ref = inputs.tensors[0]
    if ref.device.type != "cpu" or ref.numel() < FUSE_MIN_ELEMENTS:
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
            _broken.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            log.warning("fused merge kernels unavailable (%s); using the eager path", _broken[0])
        return _FAILED


def _scalar(value: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    # Eager ops take Python scalars in the tensor's compute dtype: pass them in that dtype too.
    return torch.tensor(value, dtype=dtype)


def _field32(inputs: TensorInputs, i: int, seed: int, random_field: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Model ``i``'s random draws as int32, cached beside the int16 field: inductor does not
    vectorise int16 loads (a scalar loop runs ~8x slower), so the fused path pays 4 more bytes
    per element and model for DARE/DELLA."""
    key = f"rand32:{i}"
    hit = inputs.cache.get(key)
    if hit is None or hit[0] != seed:
        hit = inputs.cache[key] = (seed, random_field(inputs, i, seed).to(torch.int32))
    return hit[1]


# --- linear combinations (linear, task_arithmetic without sparsification) -----------------------


def _lincomb_fn(out: torch.Tensor, xs: list[torch.Tensor], coefs: list[torch.Tensor], cd: torch.dtype) -> None:
    acc = xs[0].to(cd) * coefs[0].to(cd)
    for x, c in zip(xs[1:], coefs[1:]):
        acc = acc + x.to(cd) * c.to(cd)
    out.copy_(acc.to(out.dtype))


def lincomb(inputs: TensorInputs, terms: Sequence[tuple[int, float]], out: torch.Tensor) -> bool:
    """``out = sum(c * tensors[i])`` fused; False when the caller must use the eager path."""
    terms = [(i, c) for i, c in terms if c != 0.0]
    if not terms:
        return False
    xs = [inputs.tensors[i].view(-1) for i, _ in terms]
    coefs = [_scalar(c, inputs.compute_dtype) for _, c in terms]
    return _call("lincomb", _lincomb_fn, out.view(-1), xs, coefs, inputs.compute_dtype) is not _FAILED


# --- the task-arithmetic family: sparsify, weigh, (elect), add to the base -----------------------


def _sparse_delta(x: torch.Tensor, b: torch.Tensor, spec: tuple, data: list, cd: torch.dtype) -> torch.Tensor:
    """One model's sparsified task vector, as :class:`~merge_core.methods.sparsify.Masker` makes it."""
    d = x.to(cd) - b
    kind = spec[0]
    if kind == "band":  # one bound per cut within a segment (the caller splits at cut.split)
        for side, bound in zip(spec[1], data):
            big = d.abs() > bound.to(cd)  # hardshrink keeps |d| > bound
            d = torch.where(big, d, 0.0) if side == "lo" else torch.where(big, 0.0, d)
    elif kind == "random":
        field, thr = data
        d = d * (thr.to(cd) - field.to(cd)).clamp(0, 1)
    elif kind == "della":
        field, rank, a, slope = data
        p = torch.ceil(rank.to(cd) * slope.to(cd) + a.to(cd))
        d = d * (p - field.to(cd)).clamp(0, 1)
    return d


def _gta_fn(out: torch.Tensor, base: torch.Tensor, xs: list[torch.Tensor], specs: tuple, data: list,
            coefs: list[torch.Tensor], weights: Optional[list[torch.Tensor]], lam: torch.Tensor,
            consensus: bool, cd: torch.dtype) -> None:
    b = base.to(cd)
    terms = [_sparse_delta(x, b, s, dt, cd) * c.to(cd) for x, s, dt, c in zip(xs, specs, data, coefs)]
    if not consensus:
        mixed = terms[0]
        for t in terms[1:]:
            mixed = mixed + t
        out.copy_((b + mixed).to(out.dtype))  # lambda is folded into the coefficients
        return
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    sign = torch.where(total >= 0, 1.0, -1.0).to(cd)  # copysign(1, total): + on ties
    agree = [(t * sign).clamp(min=0) for t in terms]
    acc = agree[0]
    for a in agree[1:]:
        acc = acc + a
    mixed = acc * sign
    if weights is not None:
        # sum of sign(agree_i) * w_i with agree_i >= 0; divide by 1 where it is 0 (as eager does)
        den = torch.where(agree[0] > 0, weights[0].to(cd), 0.0)
        for a, w in zip(agree[1:], weights[1:]):
            den = den + torch.where(a > 0, w.to(cd), 0.0)
        mixed = mixed / torch.where(den == 0, 1.0, den)
    out.copy_((b + lam.to(cd) * mixed).to(out.dtype))


def task_arithmetic(
    inputs: TensorInputs, plans: dict[int, Any], active: list[int], coef: dict[int, float],
    weights: Optional[dict[int, float]], lam: float, consensus: bool, seed: int, out: torch.Tensor,
) -> bool:
    """The fused form of ``GeneralizedTaskArithmetic._run``; False when the caller must run eager.

    Magnitude cuts change their bound at ``cut.split`` (threshold ties kept in index order), so
    the tensor is processed in segments between those splits, each with constant bounds.
    """
    from merge_core.methods.sparsify import random_field, rank_norm

    if any(plans[i].kind not in ("full", "band", "random", "della") for i in active):
        return False
    n = inputs.tensors[0].numel()
    splits = {min(max(c.split, 0), n) for i in active if plans[i].kind == "band" for c in plans[i].cuts}
    edges = sorted({0, n, *splits})
    fields = {i: _field32(inputs, i, seed, random_field) for i in active if plans[i].kind in ("random", "della")}
    ranks = {i: rank_norm(inputs, i) for i in active if plans[i].kind == "della"}
    specs = tuple(("band", tuple(c.side for c in plans[i].cuts)) if plans[i].kind == "band" else (plans[i].kind,)
                  for i in active)
    cd = inputs.compute_dtype
    coefs = [_scalar(coef[i], cd) for i in active]
    ws = [_scalar(weights[i], cd) for i in active] if weights is not None else None
    flat_out, flat_base = out.view(-1), inputs.base.view(-1)
    flat_x = [inputs.tensors[i].view(-1) for i in active]
    for lo, hi in zip(edges, edges[1:]):
        data: list[list] = []
        for i in active:
            plan = plans[i]
            if plan.kind == "band":
                data.append([_scalar(c.bounds[0] if hi <= c.split else c.bounds[1], cd) for c in plan.cuts])
            elif plan.kind == "random":
                data.append([fields[i][lo:hi], _scalar(plan.thr, cd)])
            elif plan.kind == "della":
                data.append([fields[i][lo:hi], ranks[i][lo:hi], _scalar(plan.a, cd), _scalar(plan.b, cd)])
            else:
                data.append([])
        if _call("gta", _gta_fn, flat_out[lo:hi], flat_base[lo:hi], [x[lo:hi] for x in flat_x], specs,
                 data, coefs, ws, _scalar(lam, cd), consensus, cd) is _FAILED:
            return False
    return True


def _kept_l1_fn(base: torch.Tensor, x: torch.Tensor, spec: tuple, data: list, cd: torch.dtype) -> torch.Tensor:
    return _sparse_delta(x, base.to(cd), spec, data, cd).abs().sum(dtype=torch.float64)


def kept_l1(inputs: TensorInputs, plans: dict[int, Any], todo: list[int], seed: int) -> Optional[dict[int, float]]:
    """L1 norm of what each random plan in ``todo`` keeps (the rescale's first pass), fused;
    None when the caller must measure it eagerly."""
    from merge_core.methods.sparsify import random_field, rank_norm

    cd = inputs.compute_dtype
    out: dict[int, float] = {}
    for i in todo:
        plan = plans[i]
        if plan.kind == "random":
            spec, data = ("random",), [_field32(inputs, i, seed, random_field), _scalar(plan.thr, cd)]
        elif plan.kind == "della":
            spec = ("della",)
            data = [_field32(inputs, i, seed, random_field), rank_norm(inputs, i), _scalar(plan.a, cd),
                    _scalar(plan.b, cd)]
        else:
            return None
        total = _call("kept_l1", _kept_l1_fn, inputs.base.view(-1), inputs.tensors[i].view(-1), spec, data, cd)
        if total is _FAILED:
            return None
        out[i] = float(total)
    return out
