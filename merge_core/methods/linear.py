"""``linear``: a weighted average of the models (one chunked linear combination)."""

from __future__ import annotations

from typing import ClassVar

import torch

from merge_core.kernels.lincomb import lincomb
from merge_core.methods.base import MethodBase, MethodError, ParamSpec, TensorInputs, Values


class Linear(MethodBase):
    """mergekit ``linear``: ``sum(w_i x_i)``, divided by ``sum(w_i)`` when ``normalize``.

    The base model is ignored (every tensor is a merged model and needs a ``weight``).
    Unlike mergekit, which would divide by zero, weights summing to 0 with ``normalize``
    raise MethodError.
    """

    name: ClassVar[str] = "linear"
    base_rule = "ignored"
    global_params = (ParamSpec("normalize", True, kind="bool"),)
    model_params = (ParamSpec("weight", required=True),)

    def _merge(self, inputs: TensorInputs, glob: Values, per_model: list[Values],
               out: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        weights = [float(p["weight"]) for p in per_model]
        scale = 1.0
        if glob["normalize"]:
            total = sum(weights)
            if total == 0.0:
                raise MethodError(f"linear: weights sum to 0 for {inputs.name}, cannot normalize")
            scale = 1.0 / total
        return lincomb(inputs, [(i, w * scale) for i, w in enumerate(weights)], out)
