"""``linear``: a weighted average of the models, and the chunked kernels other methods reuse.

Many methods reduce, once their per-tensor coefficients are known, to ``sum_i c_i * x_i``
(task arithmetic without sparsification, slerp, nuslerp, model_stock).  :func:`lincomb` does
that in chunks small enough that the float32 accumulator stays in the CPU cache, so the cost is
one read of every input and one write of the output.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import ClassVar

import torch

from merge_core.methods.base import (
    MethodBase,
    MethodError,
    ParamSpec,
    TensorInputs,
    TensorParams,
)

# Elements per chunk.  On CPU a few float32 buffers of this size fit in L2/L3 (measured best
# between 64K and 256K on a 2-core EPYC); on accelerators chunks only bound scratch memory and
# larger ones save kernel launches.
CPU_CHUNK = 1 << 17
DEVICE_CHUNK = 1 << 24


def chunk_len(device: torch.device) -> int:
    """Chunk length for tensors on ``device`` (constant per device type: random streams rely on it)."""
    return CPU_CHUNK if device.type == "cpu" else DEVICE_CHUNK


def chunks(numel: int, device: torch.device) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``numel`` elements."""
    step = chunk_len(device)
    for start in range(0, numel, step):
        yield start, min(numel, start + step)


def flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of ``t`` (a copy only when ``t`` is not contiguous)."""
    return t.reshape(-1)


def shares_memory(out: torch.Tensor, tensors: Sequence[torch.Tensor]) -> bool:
    """True when ``out`` lives in the same storage as one of ``tensors``."""
    ptr = out.untyped_storage().data_ptr()
    return any(t.untyped_storage().data_ptr() == ptr for t in tensors)


class Target:
    """Where a merge writes: ``out`` itself (flat), or a contiguous stand-in copied back at the end.

    ``direct`` tells whether chunks of ``flat_out`` may serve as the float accumulator (same
    dtype as the computation and no overlap with the inputs).
    """

    def __init__(self, inputs: TensorInputs, out: torch.Tensor | None) -> None:
        ref = inputs.tensors[0]
        self.compute = inputs.compute_dtype
        self._copy_back: torch.Tensor | None = None
        if out is None:
            self.result = torch.empty(ref.shape, dtype=self.compute, device=ref.device)
        else:
            if out.shape != ref.shape:
                raise MethodError(f"{inputs.name}: out has shape {list(out.shape)}, inputs {list(ref.shape)}")
            if not out.dtype.is_floating_point:
                raise MethodError(f"{inputs.name}: out must be a float tensor, got {out.dtype}")
            self.result = out
            # Writing chunks into an input would corrupt later reads: compute aside then.
            if not out.is_contiguous() or shares_memory(out, inputs.tensors):
                self._copy_back = out
                self.result = torch.empty(ref.shape, dtype=out.dtype, device=ref.device)
        self.flat_out = self.result.view(-1)
        self.direct = self.flat_out.dtype == self.compute

    def finish(self) -> torch.Tensor:
        """Return the merged tensor (``out`` when one was given)."""
        if self._copy_back is not None:
            self._copy_back.copy_(self.result)
            return self._copy_back
        return self.result


def lincomb(
    inputs: TensorInputs,
    terms: Sequence[tuple[int, float]],
    out: torch.Tensor | None,
) -> torch.Tensor:
    """``sum(c * inputs.tensors[i] for i, c in terms)``, in chunks, computed in ``compute_dtype``.

    Terms whose coefficient is exactly 0 are skipped (their tensors are not even read).
    The in-memory merger's repeated merges of large CPU tensors run fused (:mod:`.fused`).
    """
    from merge_core.methods import fused

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

    def merge(
        self,
        inputs: TensorInputs,
        params: TensorParams,
        *,
        out: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Merge one tensor (see :class:`~merge_core.methods.base.MergeMethod`)."""
        glob, per_model = self.resolve(inputs, params)
        weights = [float(p["weight"]) for p in per_model]
        scale = 1.0
        if glob["normalize"]:
            total = sum(weights)
            if total == 0.0:
                raise MethodError(f"linear: weights sum to 0 for {inputs.name}, cannot normalize")
            scale = 1.0 / total
        return lincomb(inputs, [(i, w * scale) for i, w in enumerate(weights)], out)
