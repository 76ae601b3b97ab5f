"""mergekit's generalized task arithmetic: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

For task vectors ``d_i = model_i - base`` (base required), each sparsified (see
:mod:`~merge_core.methods.sparsify`) and multiplied by its ``weight``, ``x_i = w_i * d_i``:

* without consensus: ``mixed = sum_i x_i``, divided by ``sum_i w_i`` when ``normalize``
  (unless that is ~0);
* with TIES consensus (``ties``, ``dare_ties``, ``breadcrumbs_ties``, ``della``): per element
  the sign of ``sum_i x_i`` wins (ties go to +), ``mixed`` sums the ``x_i`` of that sign and
  ``normalize`` divides by the sum of their weights (1 where that is 0);

and the result is ``base + lambda * mixed``.  ``int8_mask`` only changes mergekit's mask
storage, never the result; it is accepted and ignored.

Implementation: one pass over chunks of the tensors (two for the random sparsifiers with
``rescale``: the first measures the kept L1 norm).  The consensus keeps running sums per
element instead of per-model masks: ``S = sum x_i``, ``P = sum max(x_i, 0)`` (so the negative
sum is ``S - P``) and, for ``normalize``, ``Q = sum w_i sign(x_i)``, ``R = sum w_i |sign(x_i)|``,
from which the agreeing weights are ``(R + Q) / 2`` (positive side) or ``(R - Q) / 2``.  All of it
stays in float arithmetic: boolean masks are many times slower in PyTorch on CPU.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from merge_core.methods.base import MethodBase, ParamSpec, TensorInputs, TensorParams
from merge_core.methods.linear import Target, chunk_len, chunks, flat, lincomb
from merge_core.methods.sparsify import Masker, Plan, Rand16, delta_chunk, draw_seed, make_plan

_WEIGHT = ParamSpec("weight", required=True)
_DENSITY = ParamSpec("density", 1.0, minimum=0.0, maximum=1.0)
_GAMMA = ParamSpec("gamma", 0.01, minimum=0.0, maximum=1.0)
_EPSILON = ParamSpec("epsilon", 0.15, minimum=0.0, maximum=1.0)


def _globals(normalize: bool, rescale: bool) -> tuple[ParamSpec, ...]:
    return (
        ParamSpec("int8_mask", False, kind="bool"),
        ParamSpec("normalize", normalize, kind="bool"),
        ParamSpec("rescale", rescale, kind="bool"),
        ParamSpec("lambda", 1.0),
    )


class GeneralizedTaskArithmetic(MethodBase):
    """The shared implementation; subclasses pick the sparsification, consensus and defaults."""

    name: ClassVar[str] = "task_arithmetic"
    base_rule = "required"
    sparsification: ClassVar[str | None] = None
    consensus: ClassVar[bool] = False
    global_params = _globals(False, False)
    model_params = (_WEIGHT, _DENSITY)

    def merge(
        self,
        inputs: TensorInputs,
        params: TensorParams,
        *,
        out: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Merge one tensor (see :class:`~merge_core.methods.base.MergeMethod`)."""
        glob, per_model = self.resolve(inputs, params)
        base = inputs.base_index
        others = inputs.others
        weights = {i: float(per_model[i]["weight"]) for i in others}
        plans = {i: self._plan(inputs, i, per_model[i], bool(glob["rescale"])) for i in others}
        lam = float(glob["lambda"])
        streams_seed = draw_seed(generator, self.name) if any(p.random for p in plans.values()) else 0
        if any(p.l1_before is not None for p in plans.values()):
            self._measure_rescale(inputs, plans, streams_seed)
        active = [i for i in others if plans[i].kind != "zero" and weights[i] != 0.0]
        if not active:
            return lincomb(inputs, [(base, 1.0)], out)
        if not self.consensus:
            total = sum(weights.values())
            div = total if glob["normalize"] and abs(total) >= 1e-8 else 1.0
            coef = {i: lam * weights[i] * plans[i].scale / div for i in active}
            if all(plans[i].kind == "full" for i in active):
                # No sparsification: base + sum k_i (x_i - base) is a plain linear combination.
                return lincomb(inputs, [(base, 1.0 - sum(coef.values()))] + list(coef.items()), out)
            return self._run(inputs, plans, active, coef, None, lam, False, streams_seed, out)
        coef = {i: weights[i] * plans[i].scale for i in active}
        return self._run(inputs, plans, active, coef, weights, lam, bool(glob["normalize"]), streams_seed, out)

    def _plan(self, inputs: TensorInputs, i: int, values: dict, rescale: bool) -> Plan:
        if self.sparsification is None:
            return Plan("full")
        return make_plan(
            self.sparsification, inputs, i, float(values["density"]), rescale,
            gamma=float(values.get("gamma", 0.0)), epsilon=float(values.get("epsilon", 0.0)),
        )

    @staticmethod
    def _measure_rescale(inputs: TensorInputs, plans: dict[int, Plan], seed: int) -> None:
        """First pass of the random sparsifiers with rescale: L1 of what each mask keeps."""
        todo = [i for i, p in plans.items() if p.l1_before is not None]
        ref = inputs.tensors[0]
        cd, step = inputs.compute_dtype, min(chunk_len(ref.device), ref.numel())
        streams = {i: Rand16(seed, i, ref.device) for i in todo}
        masker = Masker(inputs, step)
        bbuf = torch.empty(step, dtype=cd, device=ref.device)
        dbuf = torch.empty(step, dtype=cd, device=ref.device)
        parts: dict[int, list[torch.Tensor]] = {i: [] for i in todo}
        base = flat(inputs.base)
        for start, stop in chunks(ref.numel(), ref.device):
            b = base[start:stop]
            if b.dtype != cd:
                b = bbuf[: stop - start].copy_(b)
            for i in todo:
                d = delta_chunk(flat(inputs.tensors[i])[start:stop], b, dbuf[: stop - start])
                masker.apply(plans[i], i, d, start, streams[i])
                parts[i].append(d.abs_().sum())
        for i in todo:
            after = float(torch.stack(parts[i]).to(torch.float64).sum()) if parts[i] else 0.0
            before = plans[i].l1_before
            if before >= 1e-7 and after >= 1e-7:
                plans[i].scale = before / after

    def _run(
        self,
        inputs: TensorInputs,
        plans: dict[int, Plan],
        active: list[int],
        coef: dict[int, float],
        weights: dict[int, float] | None,
        lam: float,
        normalize: bool,
        seed: int,
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        """The chunked merge: ``base + lam * mix(c_i * sparse(d_i))``; ``lam`` is 1 without consensus
        (it is folded into ``coef`` there)."""
        ref = inputs.tensors[0]
        cd, dev = inputs.compute_dtype, ref.device
        size = min(chunk_len(dev), ref.numel())
        target = Target(inputs, out)

        def buf() -> torch.Tensor:
            return torch.empty(size, dtype=cd, device=dev)

        bb, d, tmp, s, p = buf(), buf(), buf(), buf(), buf()
        q, r = (buf(), buf()) if normalize else (None, None)
        one = torch.ones((), dtype=cd, device=dev)
        streams = {i: Rand16(seed, i, dev) for i in active if plans[i].random}
        masker = Masker(inputs, size)
        base = flat(inputs.base)
        xs = {i: flat(inputs.tensors[i]) for i in active}
        for start, stop in chunks(ref.numel(), dev):
            n = stop - start
            b = base[start:stop]
            if b.dtype != cd:
                b = bb[:n].copy_(b)
            dest = target.flat_out[start:stop]
            dc, tc, sc, pc = d[:n], tmp[:n], s[:n], p[:n]
            qc, rc = (q[:n], r[:n]) if normalize else (None, None)
            acc = dest if (target.direct and not self.consensus) else sc
            for k, i in enumerate(active):
                delta_chunk(xs[i][start:stop], b, dc)
                masker.apply(plans[i], i, dc, start, streams.get(i))
                c = coef[i]
                if not self.consensus:
                    if k == 0:
                        torch.mul(dc, c, out=acc)
                    else:
                        acc.add_(dc, alpha=c)
                    continue
                # x = c * d rounded first, as mergekit does, so the elected sign matches it exactly.
                if k == 0:
                    x = torch.mul(dc, c, out=sc)
                    torch.clamp(x, min=0, out=pc)
                else:
                    x = dc.mul_(c)
                    sc.add_(x)
                    pc.add_(torch.clamp(x, min=0, out=tc))
                if normalize:
                    w = weights[i]
                    torch.sign(x, out=tc)
                    if k == 0:
                        torch.mul(tc, w, out=qc)
                    else:
                        qc.add_(tc, alpha=w)
                    tc.abs_()
                    if k == 0:
                        torch.mul(tc, w, out=rc)
                    else:
                        rc.add_(tc, alpha=w)
            if self.consensus:
                acc = _elect(sc, pc, qc, rc, tc, dc, one)
            # dest = base + lam * mixed.
            if target.direct:
                torch.add(b, acc, alpha=lam, out=dest)
            else:
                if lam != 1.0:
                    acc.mul_(lam)
                dest.copy_(acc.add_(b))
        return target.finish()


def _elect(
    s: torch.Tensor, p: torch.Tensor, q: torch.Tensor | None, r: torch.Tensor | None,
    h: torch.Tensor, g: torch.Tensor, one: torch.Tensor,
) -> torch.Tensor:
    """TIES election from the running sums; returns the mixed delta (in ``p``'s storage).

    ``h``/``g`` are scratch.  ``h = 1`` where ``S >= 0`` (mergekit breaks ties towards +).
    """
    torch.sign(s, out=h)
    h.add_(1).clamp_(max=1)
    torch.sub(one, h, out=g)  # 1 where the negative side wins
    s.sub_(p).mul_(g)  # negative sum, kept where it wins
    p.mul_(h).add_(s)  # exact: one of the two terms is 0
    if q is None:
        return p
    # Agreeing weights: (R - Q) / 2 + H * Q, i.e. (R + Q) / 2 on the positive side.
    r.sub_(q).mul_(0.5).add_(q.mul_(h))
    torch.sign(r, out=g)
    torch.sub(one, g.abs_(), out=g)  # 1 where the divisor is 0 (mergekit divides by 1 there)
    return p.div_(r.add_(g))


class TaskArithmetic(GeneralizedTaskArithmetic):
    """mergekit ``task_arithmetic``: ``base + lambda * sum w_i d_i`` (no sparsification)."""

    name: ClassVar[str] = "task_arithmetic"


class Ties(GeneralizedTaskArithmetic):
    """mergekit ``ties``: magnitude sparsification + sign consensus; normalize on by default."""

    name: ClassVar[str] = "ties"
    sparsification = "magnitude"
    consensus = True
    global_params = _globals(True, False)


class DareTies(GeneralizedTaskArithmetic):
    """mergekit ``dare_ties``: random (DARE) drop + sign consensus; rescale on by default."""

    name: ClassVar[str] = "dare_ties"
    sparsification = "random"
    consensus = True
    randomized = True
    global_params = _globals(False, True)


class DareLinear(GeneralizedTaskArithmetic):
    """mergekit ``dare_linear``: random (DARE) drop, no consensus; rescale on by default."""

    name: ClassVar[str] = "dare_linear"
    sparsification = "random"
    randomized = True
    global_params = _globals(False, True)


class Breadcrumbs(GeneralizedTaskArithmetic):
    """mergekit ``breadcrumbs``: drop the largest ``gamma`` and the smallest, keep ``density``."""

    name: ClassVar[str] = "breadcrumbs"
    sparsification = "magnitude_outliers"
    model_params = (_WEIGHT, _DENSITY, _GAMMA)


class BreadcrumbsTies(Breadcrumbs):
    """mergekit ``breadcrumbs_ties``: breadcrumbs sparsification + sign consensus."""

    name: ClassVar[str] = "breadcrumbs_ties"
    consensus = True


class Della(GeneralizedTaskArithmetic):
    """mergekit ``della``: rank-based random drop (MAGPRUNE) + sign consensus; normalize, rescale on."""

    name: ClassVar[str] = "della"
    sparsification = "della_magprune"
    consensus = True
    randomized = True
    global_params = _globals(True, True)
    model_params = (_WEIGHT, _DENSITY, _EPSILON)


class DellaLinear(Della):
    """mergekit ``della_linear``: DELLA's drop without consensus; rescale on by default."""

    name: ClassVar[str] = "della_linear"
    consensus = False
    global_params = _globals(False, True)
