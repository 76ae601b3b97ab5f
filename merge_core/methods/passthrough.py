"""``passthrough``: copy the single input tensor, optionally multiplied by ``scale``."""

from __future__ import annotations

from typing import ClassVar

import torch

from merge_core.kernels.lincomb import lincomb
from merge_core.methods.base import MethodBase, ParamSpec, TensorInputs, Values


class Passthrough(MethodBase):
    """mergekit ``passthrough``: exactly one model; ``scale`` (per model, optional) multiplies it."""

    name: ClassVar[str] = "passthrough"
    base_rule = "ignored"
    model_params = (ParamSpec("scale", None),)
    max_inputs = 1

    def _merge(self, inputs: TensorInputs, glob: Values, per_model: list[Values],
               out: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        """Copy (or scale) the single input into ``out`` or a new tensor."""
        scale = per_model[0]["scale"]
        return lincomb(inputs, [(0, 1.0 if scale is None else float(scale))], out)
