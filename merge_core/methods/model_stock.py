"""``model_stock``: move from the base towards the models' average by a ratio set by their angle.

With ``N`` fine-tuned models and ``cos`` the mean pairwise cosine of their task vectors,
``t = N cos / (1 + (N - 1) cos)`` and the result is ``t * mean(models) + (1 - t) * base``
(the base is kept where the denominator vanishes).  The norms and dot products depend only on
the tensors and are cached, so a call is one chunked linear combination.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from merge_core.kernels.chunking import Target, chunks, flat
from merge_core.kernels.lincomb import lincomb
from merge_core.methods.base import MethodBase, ParamSpec, TensorInputs, Values


def _mean_cos(norms: torch.Tensor, dots: dict[tuple[int, int], torch.Tensor], n: int) -> torch.Tensor:
    cos = [
        (dots[a, b] / (norms[a] * norms[b]).clamp(min=1e-6)).clamp(-1, 1)
        for a in range(n)
        for b in range(a + 1, n)
    ]
    return torch.stack(cos).mean(dim=0)


def _ratio(cos: torch.Tensor, n: int) -> torch.Tensor:
    den = 1 + (n - 1) * cos
    singular = den.abs() < 1e-6
    return torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, den))


class ModelStock(MethodBase):
    """mergekit ``model_stock`` (base required, at least two other models).

    ``filter_wise`` computes the ratio per row (last dimension) instead of per tensor.
    """

    name: ClassVar[str] = "model_stock"
    base_rule = "required"
    global_params = (ParamSpec("filter_wise", False, kind="bool"),)
    min_inputs = 3

    def _merge(self, inputs: TensorInputs, glob: Values, per_model: list[Values],
               out: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        others = inputs.others
        n = len(others)
        base = inputs.base_index
        if glob["filter_wise"] and inputs.base.dim() > 1:
            return self._rows(inputs, others, base, out)
        norms, dots = self._flat_stats(inputs, others, base)
        t = float(_ratio(_mean_cos(norms, dots, n), n))
        return lincomb(inputs, [(i, t / n) for i in others] + [(base, 1 - t)], out)

    @staticmethod
    def _flat_stats(inputs: TensorInputs, others: list[int], base: int):
        key = f"model_stock_flat:{base}"
        if key not in inputs.cache:
            n = len(others)
            sq = torch.zeros(n, dtype=torch.float64)
            dots = {(a, b): torch.zeros((), dtype=torch.float64) for a in range(n) for b in range(a + 1, n)}
            z = flat(inputs.tensors[base])
            xs = [flat(inputs.tensors[i]) for i in others]
            for start, stop in chunks(z.numel(), z.device):
                zc = z[start:stop].to(torch.float64)
                offs = [x[start:stop].to(torch.float64) - zc for x in xs]
                for a in range(n):
                    sq[a] += torch.dot(offs[a], offs[a]).cpu()
                    for b in range(a + 1, n):
                        dots[a, b] += torch.dot(offs[a], offs[b]).cpu()
            inputs.cache[key] = (sq.sqrt(), dots)
        return inputs.cache[key]

    @staticmethod
    def _rows(inputs: TensorInputs, others: list[int], base: int, out: torch.Tensor | None) -> torch.Tensor:
        key = f"model_stock_rows:{base}"
        n = len(others)
        if key not in inputs.cache:
            z = inputs.tensors[base].to(torch.float64)
            offs = [inputs.tensors[i].to(torch.float64) - z for i in others]
            norms = torch.stack([torch.linalg.vector_norm(o, dim=-1) for o in offs])
            dots = {(a, b): (offs[a] * offs[b]).sum(dim=-1) for a in range(n) for b in range(a + 1, n)}
            inputs.cache[key] = (norms, dots)
        norms, dots = inputs.cache[key]
        cd = inputs.compute_dtype
        t = _ratio(_mean_cos(norms, dots, n), n).unsqueeze(-1).to(cd)
        avg = sum(inputs.tensors[i].to(cd) for i in others) / n
        result = t * avg + (1 - t) * inputs.tensors[base].to(cd)
        target = Target(inputs, out)
        target.result.copy_(result)
        return target.finish()
