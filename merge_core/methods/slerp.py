"""``slerp`` and ``nuslerp``: spherical interpolation between two (task) vectors.

Both reduce to ``c0 * v0 + c1 * v1`` with coefficients that depend only on ``t`` and on the
norms and dot product of the two vectors.  Those statistics depend on the tensors alone, so
they are computed once and kept in ``inputs.cache``; every later call is one chunked linear
combination (:func:`~merge_core.kernels.lincomb.lincomb`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from merge_core.kernels.chunking import Target, chunks, flat
from merge_core.kernels.lincomb import lincomb
from merge_core.methods.base import MethodBase, ParamSpec, TensorInputs, Values


def pair_stats(inputs: TensorInputs, i: int, j: int, base: int | None) -> tuple[float, float, float]:
    """``(|a|, |b|, a.b)`` over the whole tensor, for ``a = x_i - x_base`` (or ``x_i``), same for b.

    Accumulated in float64 over float32 chunks; cached per ``(i, j, base)``.
    """
    key = f"pair_stats:{i}:{j}:{base}"
    if key in inputs.cache:
        return inputs.cache[key]
    ta, tb = flat(inputs.tensors[i]), flat(inputs.tensors[j])
    tz = None if base is None else flat(inputs.tensors[base])
    saa = sbb = sab = 0.0
    for start, stop in chunks(ta.numel(), ta.device):
        a = ta[start:stop].to(torch.float64)
        b = tb[start:stop].to(torch.float64)
        if tz is not None:
            z = tz[start:stop].to(torch.float64)
            a, b = a - z, b - z
        saa += float(torch.dot(a, a))
        sbb += float(torch.dot(b, b))
        sab += float(torch.dot(a, b))
    stats = (math.sqrt(saa), math.sqrt(sbb), sab)
    inputs.cache[key] = stats
    return stats


def _spherical(t: float, theta: float) -> tuple[float, float]:
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s


class Slerp(MethodBase):
    """mergekit ``slerp``: interpolate from the base (t=0) to the other model (t=1).

    The whole tensor is one vector; nearly collinear pairs (|cos| > 0.9995) are interpolated
    linearly, as in mergekit.
    """

    name: ClassVar[str] = "slerp"
    base_rule = "required"
    global_params = (ParamSpec("t", required=True),)
    min_inputs = 2
    max_inputs = 2

    def _merge(self, inputs: TensorInputs, glob: Values, per_model: list[Values],
               out: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        t = float(glob["t"])
        b = inputs.base_index
        o = 1 - b
        na, nb, dot = pair_stats(inputs, b, o, None)
        eps = 1e-8
        na = na if na > eps else 1.0
        nb = nb if nb > eps else 1.0
        cos = min(1.0, max(-1.0, dot / (na * nb)))
        if abs(cos) > 0.9995:
            ca, cb = 1 - t, t
        else:
            ca, cb = _spherical(t, math.acos(cos))
        return lincomb(inputs, [(b, ca), (o, cb)], out)


class NuSlerp(MethodBase):
    """mergekit ``nuslerp``: slerp of two models (or of their task vectors when a base is given).

    ``t = w1 / (w0 + w1)`` from the two models' ``weight`` (0.5 when they sum to ~0).
    ``nuslerp_flatten`` (default) treats the tensor as one vector; otherwise each row
    (``nuslerp_row_wise``: each column, i.e. vectors along dim 0) is interpolated on its own.
    """

    name: ClassVar[str] = "nuslerp"
    base_rule = "optional"
    global_params = (
        ParamSpec("nuslerp_row_wise", False, kind="bool"),
        ParamSpec("nuslerp_flatten", True, kind="bool"),
    )
    model_params = (ParamSpec("weight", required=True),)
    min_non_base = 2
    max_non_base = 2

    def _merge(self, inputs: TensorInputs, glob: Values, per_model: list[Values],
               out: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        i, j = inputs.others
        base = inputs.base_index
        wi, wj = float(per_model[i]["weight"]), float(per_model[j]["weight"])
        total = wi + wj
        t = 0.5 if abs(total) < 1e-6 else wj / total
        if glob["nuslerp_flatten"] or inputs.tensors[i].dim() <= 1:
            n0, n1, dot = pair_stats(inputs, i, j, base)
            cos = dot / (max(n0, 1e-7) * max(n1, 1e-7))
            cos = min(1.0, max(-1.0, cos))
            if 1 - cos * cos <= 1e-16:
                ci, cj = 1 - t, t
            else:
                ci, cj = _spherical(t, math.acos(cos))
            terms = [(i, ci), (j, cj)]
            if base is not None:
                terms.append((base, 1.0 - ci - cj))
            return lincomb(inputs, terms, out)
        return self._per_vector(inputs, i, j, base, t, 0 if glob["nuslerp_row_wise"] else -1, out)

    def _per_vector(
        self, inputs: TensorInputs, i: int, j: int, base: int | None, t: float, dim: int,
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        """Interpolate each vector along ``dim`` separately (whole-tensor ops; not the default)."""
        key = f"nuslerp_rows:{i}:{j}:{base}:{dim}"
        cd = inputs.compute_dtype
        if key not in inputs.cache:
            v0 = inputs.tensors[i].to(torch.float64)
            v1 = inputs.tensors[j].to(torch.float64)
            if base is not None:
                z = inputs.tensors[base].to(torch.float64)
                v0, v1 = v0 - z, v1 - z
            n0 = torch.linalg.vector_norm(v0, dim=dim, keepdim=True)
            n1 = torch.linalg.vector_norm(v1, dim=dim, keepdim=True)
            dot = (v0 * v1).sum(dim=dim, keepdim=True)
            inputs.cache[key] = (n0, n1, dot)
        n0, n1, dot = inputs.cache[key]
        cos = (dot / (n0.clamp(min=1e-7) * n1.clamp(min=1e-7))).clamp(-1, 1)
        colinear = (1 - cos * cos) <= 1e-16
        theta = torch.acos(torch.where(colinear, 0.0, cos))
        sin = torch.where(colinear, 1.0, torch.sin(theta))
        ci = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin).to(cd)
        cj = torch.where(colinear, t, torch.sin(t * theta) / sin).to(cd)
        x0 = inputs.tensors[i].to(cd)
        x1 = inputs.tensors[j].to(cd)
        if base is None:
            result = ci * x0 + cj * x1
        else:
            z = inputs.tensors[base].to(cd)
            result = z + ci * (x0 - z) + cj * (x1 - z)
        target = Target(inputs, out)
        target.result.copy_(result)
        return target.finish()
