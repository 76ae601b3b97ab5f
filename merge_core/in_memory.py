"""The in-memory merger: the hot path of the evolve loop.

Input tensors are loaded once (``InMemoryMerger.__init__``); every candidate recipe is then
merged straight into a preallocated state dict or ``nn.Module`` that an evaluator holds, with no
file I/O and no reallocation.  Each output tensor keeps one :class:`TensorInputs` for the whole
run, so what a method caches there (task vectors, sorted magnitudes) is computed once.

One copy of the inputs per machine: an input kept in CPU memory in its stored dtype (resident
CPU merges, and inputs streamed to a GPU) is a read-only map of its safetensors file, so its
pages are the kernel's page cache, shared by every worker on the node (N workers hold about one
copy, not N) and never copied.  An input cast to another dtype (an fp32 checkpoint merged as
bf16) is a private copy per worker, as is every input with ``share=False``
(``MERGE_CORE_SHARE_INPUTS=0``), which also pins streamed inputs for faster copies to the GPU.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge_core.errors import ModelError
from merge_core.executor import merge_tensor
from merge_core.kernels import fused
from merge_core.kernels.inputs import TensorInputs
from merge_core.lora import open_checkpoint
from merge_core.plan_types import MergePlan, TensorTask

Source = tuple[Path, Any]  # an input's folder and LoRA adapter (InputModel.source)


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


# Bytes per element and non-base model a method keeps between candidates (the in-memory
# merger's caches, upper ends): sorted (|d|, index) keys for the magnitude methods, 16-bit draws
# (plus an int32 copy for the fused kernels) for DARE, DELLA's general form (draw + rank).
CACHE_BYTES_PER_ELEMENT = {"ties": 8, "breadcrumbs": 8, "breadcrumbs_ties": 8, "dare_ties": 4,
                           "dare_linear": 4, "della": 10, "della_linear": 10}


def format_bytes(n: int) -> str:
    """``n`` bytes for a log line: GiB, MiB or KiB, two decimals."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1024:.2f} KiB"


def _nbytes(value: object, seen: set[int]) -> int:
    """Bytes held by a cache entry: tensors and arrays, also inside tuples, lists and objects
    (each storage counted once)."""
    import numpy as np

    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        key = storage.data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(value, np.ndarray):
        base = value if value.base is None else value.base
        if id(base) in seen or not isinstance(base, np.ndarray):
            return 0
        seen.add(id(base))
        return int(base.nbytes)
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v, seen) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v, seen) for v in value.values())
    if hasattr(value, "__dict__"):
        return sum(_nbytes(v, seen) for v in vars(value).values())
    return 0


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
    ``device`` is a GPU whose free memory, less ``reserve_bytes``, cannot hold the plan's inputs
    and the method caches they will grow (:meth:`plan_cache_estimate`), plus the merged state
    dict when ``state_on_device`` (a caller that allocates :meth:`merged_state_dict` next).  Streamed merges rebuild
    methods' derived data each time (nothing is cached on the device).  ``share``: inputs kept in
    CPU memory in their stored dtype are maps of the checkpoint files (the module docstring;
    None: unless ``MERGE_CORE_SHARE_INPUTS=0``).
    """

    def __init__(self, plan: MergePlan | None = None, *, device: str = "cpu",
                 dtype: torch.dtype | None = None, resident: bool | None = None, reserve_bytes: int = 0,
                 share: bool | None = None, state_on_device: bool = False):
        self.device = torch.device(device)
        self._dtype = dtype or (plan.dtype if plan is not None else None)
        self._readers: dict[Source, Any] = {}  # CheckpointReader or LoraReader
        self._tensors: dict[tuple[Source, str], torch.Tensor] = {}
        self._inputs: dict[tuple, TensorInputs] = {}
        self.input_bytes = 0
        self.shared_bytes = 0  # of input_bytes: mapped from the page cache (shared by the node)
        self._largest = 0  # elements of the largest input tensor (see TensorInputs.fuse_small)
        self.needed_bytes = self.plan_input_bytes(plan) if plan is not None else 0
        self.cache_estimate = self.plan_cache_estimate(plan) if plan is not None else (0, "")
        state = self.plan_output_bytes(plan) if plan is not None and state_on_device else 0
        self.free_bytes: int | None = None
        if resident is None:
            resident = True
            if self.device.type == "cuda":
                self.free_bytes = int(torch.cuda.mem_get_info(self.device)[0])
                resident = self.needed_bytes + self.cache_estimate[0] + state <= self.free_bytes - reserve_bytes
        self.resident = resident
        self._storage = self.device if resident else torch.device("cpu")
        if share is None:
            share = os.environ.get("MERGE_CORE_SHARE_INPUTS", "1") != "0"
        self._share = share and self._storage.type == "cpu"
        self._pin = not resident and self.device.type == "cuda"  # private streamed inputs only
        if plan is not None:
            for task in plan.tasks:
                self._source_keys(plan, task)
            self._close_readers()

    def _tensor(self, key: tuple[Source, str]) -> torch.Tensor:
        tensor = self._tensors.get(key)
        if tensor is None:
            path, name = key
            reader = self._reader(path)
            if self._share and self._dtype in (None, reader.dtype(name)) and reader.mappable(name):
                # Read-only use of a copy-on-write map: the page cache's pages, shared by every
                # process that maps the file (a stray write would copy one page, not corrupt).
                tensor = reader.map(name)
                self.shared_bytes += tensor.numel() * tensor.element_size()
            else:
                tensor = reader.get(name, dtype=self._dtype, device=str(self._storage))
                if self._pin:
                    tensor = tensor.pin_memory()  # lets the per-merge copies to the GPU run async
            self._tensors[key] = tensor
            self.input_bytes += tensor.numel() * tensor.element_size()
            self._largest = max(self._largest, tensor.numel())
        return tensor

    def _source_keys(self, plan: MergePlan, task: TensorTask,
                     paths: list[Source] | None = None) -> tuple[tuple[Source, str], ...]:
        paths = paths or [m.source for m in plan.models]
        keys = tuple((paths[s.model], s.tensor) for s in task.sources)
        if plan.vocabulary is not None and task.vocab_axis is not None:
            return self._aligned_keys(plan, task, keys)
        for key in keys:
            self._tensor(key)
        return keys

    def _aligned_keys(self, plan: MergePlan, task: TensorTask,
                      keys: tuple[tuple[Source, str], ...]) -> tuple[tuple[Source, str], ...]:
        """Keys of ``task``'s inputs re-indexed to the plan's merged vocabulary, computed once
        (then resident like any input: never per candidate)."""
        aligned = tuple((source, f"{name}|vocabulary") for source, name in keys)
        if any(key not in self._tensors for key in aligned):
            raw = [self._tensor(key).to(self._storage) for key in keys]
            for key in keys:  # only the aligned rows are kept
                dropped = self._tensors.pop(key, None)
                if dropped is not None:
                    self.input_bytes -= dropped.numel() * dropped.element_size()
            for key, tensor in zip(aligned, plan.aligned(task, raw)):
                self._tensors[key] = tensor.contiguous()
                self.input_bytes += tensor.numel() * tensor.element_size()
                self._largest = max(self._largest, tensor.numel())
        return aligned

    def _close_readers(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def plan_input_bytes(self, plan: MergePlan) -> int:
        """Bytes the distinct input tensors of ``plan`` take in the storage dtype (from headers)."""
        total, seen = 0, set()
        for task in plan.tasks:
            for src in task.sources:
                key = (plan.models[src.model].source, src.tensor)
                if key in seen:
                    continue
                seen.add(key)
                reader = self._reader(key[0])
                itemsize = self._dtype.itemsize if self._dtype is not None else reader.dtype(src.tensor).itemsize
                total += itemsize * int(torch.Size(reader.shape(src.tensor)).numel())
        return total

    def _reader(self, source: Source) -> Any:
        """The reader of ``source`` (an input's folder and adapter), opened once."""
        reader = self._readers.get(source)
        if reader is None:
            reader = self._readers[source] = open_checkpoint(*source)
        return reader

    def plan_output_bytes(self, plan: MergePlan) -> int:
        """Bytes of :meth:`merged_state_dict`'s result for ``plan`` (from headers)."""
        total = 0
        for task in plan.tasks:
            first = task.sources[0]
            reader = self._reader(plan.models[first.model].source)
            dtype = plan.out_dtype or self._dtype or reader.dtype(first.tensor)
            total += int(torch.Size(plan.output_shape(task, reader.shape(first.tensor))).numel()) * dtype.itemsize
        return total

    def plan_cache_estimate(self, plan: MergePlan) -> tuple[int, str]:
        """(bytes, " (what)") the method caches of ``plan``'s method reach once built (the first
        candidate builds them; :data:`CACHE_BYTES_PER_ELEMENT` per element and non-base model)."""
        methods = {task.method for task in plan.tasks} & set(CACHE_BYTES_PER_ELEMENT)
        if not methods:
            return 0, ""
        elements = 0
        for task in plan.tasks:
            if task.method in methods:
                first = task.sources[0]
                reader = self._reader(plan.models[first.model].source)
                takers = len(task.sources) - (task.base_index is not None)
                elements += int(torch.Size(reader.shape(first.tensor)).numel()) * takers
        per = max(CACHE_BYTES_PER_ELEMENT[m] for m in methods)
        return elements * per, f" ({'/'.join(sorted(methods))}: {per} bytes per element and model)"

    def memory_report(self) -> str:
        """One line for a run's start: where inputs live, how much of them this process holds
        privately, and the method caches the first candidate builds (an estimate until then)."""
        where = f"resident on {self.device}" if self.resident else \
            f"in CPU memory, streamed to {self.device} per merge"
        free = "" if self.free_bytes is None else f" ({format_bytes(self.free_bytes)} free on {self.device})"
        if self._storage.type == "cpu":
            private = self.input_bytes - self.shared_bytes
            where += (f", {format_bytes(self.shared_bytes)} of it mapped from the page cache (one copy per machine, "
                      f"shared by its workers), {format_bytes(private)} private{' (pinned)' if self._pin and private else ''}")
        built = self.cache_bytes()
        estimate, what = self.cache_estimate
        caches = format_bytes(built) if built else f"~{format_bytes(estimate)} once built{what}"
        return f"merge inputs: {format_bytes(self.needed_bytes)} {where}{free}; method caches on {self._storage}: {caches}"

    def cache_bytes(self) -> int:
        """Bytes of what the methods derived from the inputs and keep between candidates (sorted
        keys, random fields, ranks...), as held now."""
        seen: set[int] = set()
        return sum(_nbytes(value, seen) for inputs in self._inputs.values() for value in inputs.cache.values())

    def _inputs_for(self, plan: MergePlan, task: TensorTask, paths: list[Source]) -> TensorInputs:
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
        paths = [m.source for m in plan.models]  # once per plan: Path() per tensor showed in profiles
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
