"""``sum_i c_i * x_i`` over whole tensors: the kernel most methods reduce to.

Linear, task arithmetic without sparsification, slerp, nuslerp, model_stock and passthrough
all end, once their per-tensor coefficients are known, in one linear combination of the
models' tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merge_core.kernels import fused
from merge_core.kernels.chunking import Target, chunk_len, chunks, flat
from merge_core.kernels.inputs import TensorInputs


def lincomb(
    inputs: TensorInputs,
    terms: Sequence[tuple[int, float]],
    out: torch.Tensor | None,
) -> torch.Tensor:
    """``sum(c * inputs.tensors[i] for i, c in terms)``, in chunks, computed in ``compute_dtype``.

    Terms whose coefficient is exactly 0 are skipped (their tensors are not even read).
    The in-memory merger's repeated merges of large CPU tensors run fused (:mod:`.fused`).
    """
    if fused.usable(inputs, out, needs_out=True) and fused.lincomb(inputs, terms, out):
        return out
    target = Target(inputs, out)
    terms = [(i, float(c)) for i, c in terms if c != 0.0]
    sources = [(flat(inputs.tensors[i]), c) for i, c in terms]
    ref = inputs.tensors[0]
    cd = target.compute
    step = chunk_len(ref.device)
    acc_buf = None if target.direct else torch.empty(min(step, ref.numel()), dtype=cd, device=ref.device)
    tmp = torch.empty(min(step, ref.numel()), dtype=cd, device=ref.device)
    for start, stop in chunks(ref.numel(), ref.device):
        n = stop - start
        acc = target.flat_out[start:stop] if acc_buf is None else acc_buf[:n]
        if not sources:
            acc.zero_()
        for k, (src, c) in enumerate(sources):
            part = src[start:stop]
            if k == 0:
                if part.dtype == cd:
                    torch.mul(part, c, out=acc)
                else:
                    acc.copy_(part)
                    if c != 1.0:
                        acc.mul_(c)
            elif part.dtype == cd:
                acc.add_(part, alpha=c)
            else:
                t = tmp[:n]
                t.copy_(part)
                acc.add_(t, alpha=c)
        if acc_buf is not None:
            target.flat_out[start:stop].copy_(acc)
    return target.finish()
