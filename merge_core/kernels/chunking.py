"""Chunked element-wise passes: chunk sizes, flat views and the output target.

The kernels walk tensors in chunks small enough that a few float32 buffers stay in the CPU
cache, so a merge costs about one read of every input and one write of the output.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from merge_core.errors import MethodError
from merge_core.kernels.inputs import TensorInputs

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
