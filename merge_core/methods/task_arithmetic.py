"""mergekit's generalized task arithmetic: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

For task vectors ``d_i = model_i - base`` (base required), each sparsified (see
:mod:`~merge_core.kernels.sparsify`) and multiplied by its ``weight``, ``x_i = w_i * d_i``:

* without consensus: ``mixed = sum_i x_i``, divided by ``sum_i w_i`` when ``normalize``
  (unless that is ~0);
* with TIES consensus (``ties``, ``dare_ties``, ``breadcrumbs_ties``, ``della``): per element
  the sign of ``sum_i x_i`` wins (ties go to +), ``mixed`` sums the ``x_i`` of that sign and
  ``normalize`` divides by the sum of their weights (1 where that is 0);

and the result is ``base + lambda * mixed``.  ``int8_mask`` only changes mergekit's mask
storage, never the result; it is accepted and ignored.

Implementation: one pass over chunks of the tensors (two for a one-shot DELLA with ``rescale``:
the first measures the kept L1 norm; the other sparsifiers, and repeated DELLA merges, know it
from their plan).  The consensus keeps
each model's chunk ``x_i``, takes the sign ``g`` of ``sum x_i`` and sums ``max(g x_i, 0)`` (and,
for ``normalize``, ``w_i sign(max(g x_i, 0))``): all float arithmetic, since boolean masks are
several times slower in PyTorch on CPU.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from merge_core.kernels import fused
from merge_core.kernels.chunking import Target, chunk_len, chunks, flat
from merge_core.kernels.lincomb import lincomb
from merge_core.kernels.plans import Plan
from merge_core.kernels.random_fields import draw_seed
from merge_core.kernels.sparsify import Masker, make_plan
from merge_core.kernels.task_vectors import RESCALE_EPS, delta_chunk
from merge_core.methods.base import MethodBase, ParamSpec, TensorInputs, Values

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
    clear_one_shot_cache = True  # one-shot: per-call data (random fields, ranks) is not kept

    def _merge(self, inputs: TensorInputs, glob: Values, per_model: list[Values],
               out: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        base = inputs.base_index
        others = inputs.others
        weights = {i: float(per_model[i]["weight"]) for i in others}
        seed = draw_seed(generator, self.name) if self.sparsification in ("random", "della_magprune") else 0
        rescale = bool(glob["rescale"])
        plans = {
            i: self._plan(inputs, i, per_model[i], rescale, seed) if weights[i] != 0.0 else Plan("zero")
            for i in others
        }
        lam = float(glob["lambda"])
        if any(p.l1_before is not None for p in plans.values()):
            self._measure_rescale(inputs, plans)
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
            return self._run(inputs, plans, active, coef, None, 1.0, False, out)  # lam is in coef
        coef = {i: weights[i] * plans[i].scale for i in active}
        return self._run(inputs, plans, active, coef, weights, lam, bool(glob["normalize"]), out)

    def _plan(self, inputs: TensorInputs, i: int, values: Values, rescale: bool, seed: int) -> Plan:
        if self.sparsification is None:
            return Plan("full")
        return make_plan(
            self.sparsification, inputs, i, float(values["density"]), rescale,
            gamma=float(values.get("gamma", 0.0)), epsilon=float(values.get("epsilon", 0.0)), seed=seed,
        )

    @staticmethod
    def _measure_rescale(inputs: TensorInputs, plans: dict[int, Plan]) -> None:
        """First pass of the random sparsifiers with rescale: L1 of what each mask keeps."""
        todo = [i for i, p in plans.items() if p.l1_before is not None]
        kept = fused.kept_l1(inputs, plans, todo) if fused.usable(inputs) else None
        if kept is not None:
            for i in todo:
                _rescale(plans[i], kept[i])
            return
        ref = inputs.tensors[0]
        cd, step = inputs.compute_dtype, min(chunk_len(ref.device), ref.numel())
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
                masker.apply(plans[i], i, d, start)
                parts[i].append(d.abs_().sum())
        for i in todo:
            after = float(torch.stack(parts[i]).to(torch.float64).sum()) if parts[i] else 0.0
            _rescale(plans[i], after)

    def _run(
        self,
        inputs: TensorInputs,
        plans: dict[int, Plan],
        active: list[int],
        coef: dict[int, float],
        weights: dict[int, float] | None,
        lam: float,
        normalize: bool,
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        """The chunked merge: ``base + lam * mix(c_i * sparse(d_i))``; ``lam`` is 1 without consensus
        (it is folded into ``coef`` there).  Large CPU tensors of the in-memory merger run fused."""
        if fused.usable(inputs, out, needs_out=True) and fused.task_arithmetic(
            inputs, plans, active, coef, weights if normalize else None, lam, self.consensus, out
        ):
            return out
        ref = inputs.tensors[0]
        cd, dev = inputs.compute_dtype, ref.device
        size = min(chunk_len(dev), ref.numel())
        target = Target(inputs, out)

        def buf() -> torch.Tensor:
            return torch.empty(size, dtype=cd, device=dev)

        bb, d = buf(), buf()
        xbufs = [buf() for _ in active] if self.consensus else []
        s = buf()  # the sum of the x_i (consensus) or the accumulator (when ``out`` is not direct)
        sgn, den = (buf(), buf()) if self.consensus else (None, None)
        one = torch.ones((), dtype=cd, device=dev)
        masker = Masker(inputs, size)
        base = flat(inputs.base)
        xs = {i: flat(inputs.tensors[i]) for i in active}
        ws = [weights[i] for i in active] if normalize else None
        for start, stop in chunks(ref.numel(), dev):
            n = stop - start
            b = base[start:stop]
            if b.dtype != cd:
                b = bb[:n].copy_(b)
            dest = target.flat_out[start:stop]
            if not self.consensus:
                acc = dest if target.direct else s[:n]
                dc = d[:n]
                for k, i in enumerate(active):
                    delta_chunk(xs[i][start:stop], b, dc)
                    masker.apply(plans[i], i, dc, start)
                    if k == 0:
                        torch.mul(dc, coef[i], out=acc)
                    else:
                        acc.add_(dc, alpha=coef[i])
            else:
                chunk_x = []
                for k, i in enumerate(active):
                    x = xbufs[k][:n]
                    delta_chunk(xs[i][start:stop], b, x)
                    masker.apply(plans[i], i, x, start)
                    chunk_x.append(x.mul_(coef[i]))  # x = c * d rounded first, as mergekit does
                acc = _elect(chunk_x, ws, s[:n], sgn[:n], den[:n], one)
            # dest = base + lam * mixed.
            if target.direct:
                torch.add(b, acc, alpha=lam, out=dest)
            else:
                if lam != 1.0:
                    acc.mul_(lam)
                dest.copy_(acc.add_(b))
        return target.finish()


def _rescale(plan: Plan, after: float) -> None:
    """Set ``plan.scale`` from the kept L1 ``after`` measured by the first pass; left alone when
    either norm is below RESCALE_EPS (or NaN), as mergekit leaves such tensors unscaled."""
    before = plan.l1_before
    if before >= RESCALE_EPS and after >= RESCALE_EPS:
        plan.scale = before / after


def _elect(
    xs: list[torch.Tensor], weights: list[float] | None,
    s: torch.Tensor, sgn: torch.Tensor, den: torch.Tensor, one: torch.Tensor,
) -> torch.Tensor:
    """TIES election over one chunk of the weighted sparse task vectors ``xs`` (overwritten).

    Returns the mixed delta (in ``xs[0]``'s storage): per element the sign of ``sum x_i`` wins
    (+ on ties), the agreeing ``x_i`` are summed and, with ``weights``, divided by the sum of
    their weights (by 1 where that is 0).  Agreement is ``x_i * sign > 0``, so the sum runs over
    ``max(x_i * sign, 0)`` and is multiplied back by the sign: the same roundings as mergekit's
    masked sum.  Boolean masks are avoided: they are several times slower in PyTorch on CPU.
    """
    total = xs[0]
    if len(xs) > 1:
        total = torch.add(xs[0], xs[1], out=s)
        for x in xs[2:]:
            total.add_(x)
    # +1 where the sum is >= 0.  A sum of -0 only arises when every x_i is 0, where the sign
    # does not matter.
    torch.copysign(one, total, out=sgn)
    acc = xs[0].mul_(sgn).clamp_(min=0)
    if weights is not None:
        torch.sign(acc, out=den).mul_(weights[0])
    for x, w in zip(xs[1:], (weights or [0.0] * len(xs))[1:]):
        x.mul_(sgn).clamp_(min=0)
        acc.add_(x)
        if weights is not None:
            den.add_(x.sign_(), alpha=w)
    acc.mul_(sgn)
    if weights is None:
        return acc
    # den + (1 - |sign(den)|): 1 where the agreeing weights sum to 0, unchanged elsewhere.
    torch.sign(den, out=s).abs_()
    torch.sub(one, s, out=s)
    return acc.div_(den.add_(s))


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
