"""``passthrough``: copy the single input tensor, optionally multiplied by ``scale``."""

from __future__ import annotations

from typing import ClassVar

import torch

from merge_core.methods.base import MethodBase, ParamSpec, TensorInputs, TensorParams
from merge_core.methods.linear import lincomb


class Passthrough(MethodBase):
    """mergekit ``passthrough``: exactly one model; ``scale`` (per model, optional) multiplies it."""

    name: ClassVar[str] = "passthrough"
    base_rule = "ignored"
    model_params = (ParamSpec("scale", None),)
    max_inputs = 1

    def merge(
        self,
        inputs: TensorInputs,
        params: TensorParams,
        *,
        out: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Copy (or scale) the single input into ``out`` or a new tensor."""
        _, per_model = self.resolve(inputs, params)
        scale = per_model[0]["scale"]
        return lincomb(inputs, [(0, 1.0 if scale is None else float(scale))], out)
