"""Task vectors ``d = model - base`` and the numbers taken from them (magnitudes, L1 rescale)."""

from __future__ import annotations

import numpy as np
import torch

from merge_core.kernels.chunking import flat
from merge_core.kernels.inputs import TensorInputs

RESCALE_EPS = 1e-7  # mergekit leaves the tensor unscaled when either L1 norm is below this
NUMPY_DTYPES = (torch.float32, torch.float64)
"""Compute dtypes numpy handles natively (its sorts and compares beat torch's on CPU); others
are widened to float32 first."""


def delta_chunk(x: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``x - base`` into ``out`` (``base`` already in ``out``'s dtype)."""
    if x.dtype == out.dtype:
        return torch.sub(x, base, out=out)
    out.copy_(x)
    return out.sub_(base)


def deltas(inputs: TensorInputs, i: int) -> torch.Tensor:
    """Model ``i``'s whole task vector, in the compute dtype (a new tensor)."""
    cd = inputs.compute_dtype
    return inputs.tensors[i].to(cd) - inputs.base.to(cd)


def abs_numpy(inputs: TensorInputs, i: int) -> np.ndarray:
    """``|model_i - base|`` as a flat numpy array (float32 unless the compute dtype is float64)."""
    mags = flat(deltas(inputs, i)).abs_()
    if mags.dtype not in NUMPY_DTYPES:
        mags = mags.float()  # bf16/fp16 magnitudes are exact in float32
    return mags.cpu().numpy()


def l1_scale(before: float, after: float) -> float:
    """The L1 rescale factor ``before / after``; 1 when either norm is below :data:`RESCALE_EPS`
    (as mergekit leaves such tensors unscaled)."""
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return 1.0
    return before / after
