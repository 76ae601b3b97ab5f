"""The in-memory merger: the hot path of the evolve loop.

Input tensors are loaded once (``InMemoryMerger.__init__``); every candidate recipe is then
merged straight into a preallocated state dict or ``nn.Module`` that an evaluator holds, with no
file I/O and no reallocation.  Each output tensor keeps one :class:`TensorInputs` for the whole
run, so what a method caches there (task vectors, sorted magnitudes) is computed once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from merge_core.errors import ModelError
from merge_core.executor import merge_tensor
from merge_core.methods.base import TensorInputs
from merge_core.plan_types import MergePlan, TensorSource, TensorTask
from merge_core.tensor_io import CheckpointReader


@dataclass(frozen=True)
class MergeStats:
    """What one ``merge_into`` call did (for benchmarks and logs)."""

    tensors: int
    seconds: float


class InMemoryMerger:
    """Holds the input models' tensors and merges plans into a target model in place.

    ``plan`` fixes which tensors are loaded: any later plan passed to :meth:`merge_into` must draw
    on the same (model, tensor) sources, as the plans of one evolve run do (they differ in
    parameter values only).  ``device`` is where inputs live and the math runs; ``dtype`` is
    the storage dtype of the inputs (the recipe's ``dtype`` when None).
    """

    def __init__(self, plan: MergePlan, *, device: str = "cpu", dtype: torch.dtype | None = None):
        self.device = torch.device(device)
        self._dtype = dtype or plan.dtype
        self._tensors: dict[TensorSource, torch.Tensor] = {}
        self._inputs: dict[tuple, TensorInputs] = {}
        self.input_bytes = 0
        needed: dict[int, set[str]] = {}
        for task in plan.tasks:
            for source in task.sources:
                needed.setdefault(source.model, set()).add(source.tensor)
        for index, names in needed.items():
            with CheckpointReader(plan.models[index].path) as reader:
                for name in sorted(names):
                    tensor = reader.get(name, dtype=self._dtype, device=str(self.device))
                    self._tensors[TensorSource(index, name)] = tensor
                    self.input_bytes += tensor.numel() * tensor.element_size()

    def _inputs_for(self, task: TensorTask) -> TensorInputs:
        key = (task.output, task.sources, task.base_index)
        inputs = self._inputs.get(key)
        if inputs is None:
            try:
                tensors = [self._tensors[s] for s in task.sources]
            except KeyError as err:
                raise ModelError(f"{task.output}: source {err.args[0]} was not loaded") from None
            inputs = TensorInputs(task.output, tensors, task.base_index)
            self._inputs[key] = inputs
        return inputs

    @torch.no_grad()
    def merge_into(
        self, plan: MergePlan, target: Mapping[str, torch.Tensor] | torch.nn.Module
    ) -> MergeStats:
        """Write every tensor of ``plan`` into ``target`` (a state dict or a module), in place."""
        import time

        start = time.perf_counter()
        params = target.state_dict() if isinstance(target, torch.nn.Module) else target
        for task in plan.tasks:
            out = params.get(task.output)
            if out is None:
                raise ModelError(f"{task.output}: the target model has no such tensor")
            inputs = self._inputs_for(task)
            merge_tensor(task, inputs.tensors, out=out, inputs=inputs)
        return MergeStats(len(plan.tasks), time.perf_counter() - start)

    def merged_state_dict(self, plan: MergePlan, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """A new state dict holding ``plan``'s merge (allocates; for tests and one-off exports)."""
        dtype = dtype or plan.out_dtype or self._dtype or torch.float32
        out: dict[str, torch.Tensor] = {}
        for task in plan.tasks:
            first = self._tensors[task.sources[0]]
            out[task.output] = torch.empty(first.shape, dtype=dtype, device=self.device)
        self.merge_into(plan, out)
        return out
