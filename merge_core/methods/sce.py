"""``sce``: select (by variance across models), calculate (weights from energy), erase (signs).

1. *Select*: with ``select_topk < 1`` only the elements whose task vectors vary most across
   the models are kept (the top ``select_topk`` fraction of the elements with non-zero variance).
2. *Calculate*: each model's weight is the mean square of its (selected) task vector,
   normalised to sum 1 (uniform when they are all ~0).
3. *Erase*: TIES sign election; elements disagreeing with the weighted majority are dropped,
   and the rest averaged with the weights.

Not on the evolve hot path, so written with whole-tensor operations.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from merge_core.kernels.chunking import Target
from merge_core.methods.base import MethodBase, ParamSpec, TensorInputs, Values


def _select_mask(tvs: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 where an element's variance across models is among the top ``fraction`` of the non-zero ones."""
    if fraction <= 0:
        return torch.zeros_like(tvs[0])
    if fraction >= 1:
        return torch.ones_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * fraction)
    mask = torch.zeros_like(var)
    if k > 0:
        mask.view(-1)[torch.topk(var.view(-1), k=k, largest=True).indices] = 1
    return mask


class Sce(MethodBase):
    """mergekit ``sce`` (base required; no per-model parameters).

    ``int8_mask`` only changes mergekit's mask storage, not the result; it is accepted and ignored.
    """

    name: ClassVar[str] = "sce"
    base_rule = "required"
    global_params = (
        ParamSpec("int8_mask", False, kind="bool"),
        ParamSpec("select_topk", 1.0, minimum=0.0, maximum=1.0),
    )

    def _merge(self, inputs: TensorInputs, glob: Values, per_model: list[Values],
               out: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        cd = inputs.compute_dtype
        base = inputs.base.to(cd)
        target = Target(inputs, out)
        if not inputs.others:
            target.result.copy_(base)
            return target.finish()
        tvs = torch.stack([inputs.tensors[i].to(cd) - base for i in inputs.others])
        if glob["select_topk"] < 1:
            tvs *= _select_mask(tvs, float(glob["select_topk"]))
        energy = tvs.square().reshape(len(tvs), -1).mean(dim=1)
        total = float(energy.sum())
        weights = torch.full_like(energy, 1 / len(tvs)) if abs(total) < 1e-6 else energy / total
        weights = weights.reshape(-1, *([1] * base.dim()))
        majority = torch.where(tvs.sum(dim=0) >= 0, 1.0, -1.0).to(cd)
        agree = (tvs.sign() == majority).to(cd)
        kept = weights * agree
        merged = (tvs * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1e-6)
        target.result.copy_(base + merged)
        return target.finish()
