"""The random methods' draws: one uniform 16-bit field per model and call, and its L1 lookup.

Each model gets one uniform int16 field per call, drawn whole from a stream seeded by
``(seed drawn from the caller's generator, model index)`` (numpy SFC64, on the CPU for every
device and copied to a GPU: a recipe merged on a GPU keeps exactly the elements a CPU merge of it
keeps, so an evolve candidate merged on a GPU is the model ``merge-yaml`` exports), and an element
is kept when its draw is below the keep probability (a multiple of 1/65536).  The in-memory
merger caches the field (2 bytes per element; the planner's seeds do not change between
candidates) and, for the rescale, the L1 of ``|d|`` per field value (:func:`cumulative_l1`),
so a candidate's mask is one compare and its rescale a lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from merge_core.errors import MethodError
from merge_core.kernels.caches import cached_for_seed
from merge_core.kernels.inputs import TensorInputs
from merge_core.kernels.task_vectors import abs_numpy


def draw_seed(generator: torch.Generator | None, name: str) -> int:
    """One 62-bit seed from the caller's generator (the random methods' only use of it)."""
    if generator is None:
        raise MethodError(f"{name}: a randomized method needs a generator (seed)")
    return int(torch.randint(0, 1 << 62, (1,), generator=generator, device=generator.device))


def random_field(inputs: TensorInputs, i: int, seed: int) -> torch.Tensor:
    """Model ``i``'s uniform int16 draws for one call (flat, on the tensors' device); cached per seed."""
    return cached_for_seed(inputs, f"draws:{i}", seed, lambda: draw_field(inputs.tensors[i], i, seed))


def draw_field(ref: torch.Tensor, i: int, seed: int) -> torch.Tensor:
    """``ref.numel()`` uniform int16 draws for model ``i`` from the stream of ``seed`` (uncached),
    on ``ref``'s device; the same numbers on every device (drawn on the CPU)."""
    n = ref.numel()
    bits = np.random.SFC64(np.random.SeedSequence([seed, i]))
    field = torch.from_numpy(bits.random_raw((n + 3) // 4)).view(torch.int16)[:n]
    return field if ref.device.type == "cpu" else field.to(ref.device)


def cumulative_l1(
    inputs: TensorInputs, i: int, name: str, version: Any, field: Callable[[], torch.Tensor]
) -> np.ndarray:
    """Cumulative ``sum |d|`` of model ``i`` over the values of its 16-bit field ``name``
    (``field()`` builds it; float64, 65536 bins, value -32768 first): the L1 that keeping the
    values below any threshold keeps.  Cached under ``l1:<name>:<i>`` for ``version``."""

    def build() -> np.ndarray:
        values = field().cpu().numpy().view(np.uint16) ^ np.uint16(0x8000)
        return np.cumsum(np.bincount(values, weights=abs_numpy(inputs, i), minlength=65536))

    return cached_for_seed(inputs, f"l1:{name}:{i}", version, build)
