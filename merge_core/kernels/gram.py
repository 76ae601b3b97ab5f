"""Gram matrices of (task) vectors: every dot product between several whole tensors, in one pass.

Spherical means of whole tensors (multislerp, karcher) only ever combine the input vectors
linearly, so once the inputs' dot products are known every step of their geometry can be done
on a few numbers and the result written as one linear combination
(:func:`~merge_core.kernels.lincomb.lincomb`).  The dot products depend only on the tensors, so
they are kept in ``inputs.cache``.
"""

from __future__ import annotations

import torch

from merge_core.kernels.caches import cached
from merge_core.kernels.chunking import chunks, flat
from merge_core.kernels.inputs import TensorInputs


def gram(inputs: TensorInputs, indices: list[int], base: int | None) -> torch.Tensor:
    """``G[a, b] = v_a . v_b`` (float64, shape ``(n, n)``) for ``v_a = x_{indices[a]} - x_base``
    (or ``x_{indices[a]}`` when ``base`` is None), over the whole flattened tensors.

    Each chunk is widened to float64 before the differences and products, so the matrix is the
    exact Gram matrix of the (float32-representable) inputs to float64 rounding.
    """

    def build() -> torch.Tensor:
        n = len(indices)
        out = torch.zeros((n, n), dtype=torch.float64)
        xs = [flat(inputs.tensors[i]) for i in indices]
        z = None if base is None else flat(inputs.tensors[base])
        ref = xs[0]
        for start, stop in chunks(ref.numel(), ref.device):
            rows = torch.stack([x[start:stop].to(torch.float64) for x in xs])
            if z is not None:
                rows -= z[start:stop].to(torch.float64)
            out += (rows @ rows.T).cpu()
        return out

    return cached(inputs, f"gram:{','.join(map(str, indices))}:{base}", build)
