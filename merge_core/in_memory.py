"""The in-memory merger: the hot path of the evolve loop.

Input tensors are loaded once (``InMemoryMerger.__init__``); every candidate recipe is then
merged straight into a preallocated state dict or ``nn.Module`` that an evaluator holds, with no
file I/O and no reallocation.  Each output tensor keeps one :class:`TensorInputs` for the whole
run, so what a method caches there (task vectors, sorted magnitudes) is computed once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_core.errors import ModelError
from merge_core.executor import merge_tensor
from merge_core.kernels import fused
from merge_core.kernels.inputs import TensorInputs
from merge_core.plan_types import MergePlan, TensorTask
from merge_core.tensor_io import CheckpointReader


def _return_freed_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``; elsewhere a no-op).

    Building a method's caches allocates and frees many tensors below glibc's (self-raising)
    mmap threshold; the freed heap stays resident, which at 500M parameters made the first DELLA
    merges peak past 24 GB.  Called only after a tensor's caches changed, never in the steady
    per-candidate loop.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


@dataclass(frozen=True)
class MergeStats:
    """What one ``merge_into`` call did (for benchmarks and logs)."""

    tensors: int
    seconds: float


class InMemoryMerger:
    """Holds the input models' tensors and merges plans into a target model in place.

    Input tensors are keyed by (model directory, tensor name), not by a plan's model numbering,
    so plans that list their models in different orders (slerp candidates pick different pairs
    per layer group) share them.  ``plan`` (optional) is loaded eagerly; any tensor a later plan
    needs beyond it is read on first use and kept.  ``device`` is where the math runs; ``dtype``
    is the storage dtype of the inputs (the plan's ``dtype`` when None).

    ``resident``: inputs live on ``device`` (True), or in CPU memory (False; pinned when
    ``device`` is a GPU) and are copied to ``device`` tensor by tensor for each merge -- for
    inputs that do not fit in GPU memory next to the evaluated model.  None = resident unless
    ``device`` is a GPU whose free memory, less ``reserve_bytes``, cannot hold the plan's inputs.
    Streamed merges rebuild methods' derived data each time (nothing is cached on the device).
    """

    def __init__(self, plan: MergePlan | None = None, *, device: str = "cpu",
                 dtype: torch.dtype | None = None, resident: bool | None = None, reserve_bytes: int = 0):
        self.device = torch.device(device)
        self._dtype = dtype or (plan.dtype if plan is not None else None)
        self._readers: dict[Path, CheckpointReader] = {}
        self._tensors: dict[tuple[Path, str], torch.Tensor] = {}
        self._inputs: dict[tuple, TensorInputs] = {}
        self.input_bytes = 0
        self._largest = 0  # elements of the largest input tensor (see TensorInputs.fuse_small)
        self.needed_bytes = self.plan_input_bytes(plan) if plan is not None else 0
        self.free_bytes: int | None = None
        if resident is None:
            resident = True
            if self.device.type == "cuda":
                self.free_bytes = int(torch.cuda.mem_get_info(self.device)[0])
                resident = self.needed_bytes <= self.free_bytes - reserve_bytes
        self.resident = resident
        self._storage = self.device if resident else torch.device("cpu")
        self._pin = not resident and self.device.type == "cuda"
        if plan is not None:
            for task in plan.tasks:
                self._source_keys(plan, task)
            self._close_readers()

    def _tensor(self, key: tuple[Path, str]) -> torch.Tensor:
        tensor = self._tensors.get(key)
        if tensor is None:
            path, name = key
            reader = self._readers.get(path)
            if reader is None:
                reader = self._readers[path] = CheckpointReader(path)
            tensor = reader.get(name, dtype=self._dtype, device=str(self._storage))
            if self._pin:
                tensor = tensor.pin_memory()  # lets the per-merge copies to the GPU run async
            self._tensors[key] = tensor
            self.input_bytes += tensor.numel() * tensor.element_size()
            self._largest = max(self._largest, tensor.numel())
        return tensor

    def _source_keys(self, plan: MergePlan, task: TensorTask,
                     paths: list[Path] | None = None) -> tuple[tuple[Path, str], ...]:
        paths = paths or [Path(m.path) for m in plan.models]
        keys = tuple((paths[s.model], s.tensor) for s in task.sources)
        for key in keys:
            self._tensor(key)
        return keys

    def _close_readers(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def plan_input_bytes(self, plan: MergePlan) -> int:
        """Bytes the distinct input tensors of ``plan`` take in the storage dtype (from headers)."""
        total, seen = 0, set()
        for task in plan.tasks:
            for src in task.sources:
                key = (Path(plan.models[src.model].path), src.tensor)
                if key in seen:
                    continue
                seen.add(key)
                reader = self._readers.get(key[0])
                if reader is None:
                    reader = self._readers[key[0]] = CheckpointReader(key[0])
                itemsize = self._dtype.itemsize if self._dtype is not None else reader.dtype(src.tensor).itemsize
                total += itemsize * int(torch.Size(reader.shape(src.tensor)).numel())
        return total

    def memory_report(self) -> str:
        """One line for a run's start: where inputs live and how much memory they take."""
        gib = 1 << 30
        where = f"resident on {self.device}" if self.resident else \
            f"in {'pinned ' if self._pin else ''}CPU memory, streamed to {self.device} per merge"
        free = "" if self.free_bytes is None else f" ({self.free_bytes / gib:.2f} GiB free on {self.device})"
        return f"merge inputs: {self.needed_bytes / gib:.2f} GiB {where}{free}"

    def _inputs_for(self, plan: MergePlan, task: TensorTask, paths: list[Path]) -> TensorInputs:
        keys = self._source_keys(plan, task, paths)
        if not self.resident:  # one-shot copies on the compute device, freed after the merge
            tensors = [self._tensors[k].to(self.device, non_blocking=True) for k in keys]
            return TensorInputs(task.output, tensors, task.base_index, reuse=False)
        cache_key = (task.output, keys, task.base_index)
        inputs = self._inputs.get(cache_key)
        if inputs is None:
            inputs = TensorInputs(task.output, [self._tensors[k] for k in keys], task.base_index, reuse=True)
            self._inputs[cache_key] = inputs
        inputs.fuse_small = self._largest >= fused.FUSE_MIN_ELEMENTS  # a later plan may add large ones
        return inputs

    @torch.no_grad()
    def merge_into(
        self, plan: MergePlan, target: Mapping[str, torch.Tensor] | torch.nn.Module
    ) -> MergeStats:
        """Write every tensor of ``plan`` into ``target`` (a state dict or a module), in place."""
        import time

        start = time.perf_counter()
        params = target.state_dict() if isinstance(target, torch.nn.Module) else target
        paths = [Path(m.path) for m in plan.models]  # once per plan: Path() per tensor showed in profiles
        for task in plan.tasks:
            out = params.get(task.output)
            if out is None:
                raise ModelError(f"{task.output}: the target model has no such tensor")
            inputs = self._inputs_for(plan, task, paths)
            cached = len(inputs.cache)
            merge_tensor(task, inputs.tensors, out=out, inputs=inputs)
            if len(inputs.cache) != cached and self.device.type == "cpu":
                _return_freed_memory()  # caches were built: their temporaries fragment the heap
        self._close_readers()  # lazily opened for tensors this plan added
        return MergeStats(len(plan.tasks), time.perf_counter() - start)

    def clear_caches(self) -> None:
        """Drop what methods derived from the inputs (sorted magnitudes, random fields, ranks);
        the inputs stay loaded.  For switching to another merge method in one process."""
        for inputs in self._inputs.values():
            inputs.cache.clear()

    def merged_state_dict(self, plan: MergePlan, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """A new state dict holding ``plan``'s merge (allocates; for tests and one-off exports)."""
        dtype = dtype or plan.out_dtype or self._dtype or torch.float32
        out: dict[str, torch.Tensor] = {}
        for task in plan.tasks:
            first = self._tensor(self._source_keys(plan, task)[0])
            out[task.output] = torch.empty(first.shape, dtype=dtype, device=self.device)
        self.merge_into(plan, out)
        return out
