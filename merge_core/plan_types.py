"""The merge plan: what the planner (recipe semantics) hands to the executors (tensor work).

The planner turns a recipe plus the input models' configs and tensor headers into one
:class:`TensorTask` per output tensor, with every parameter already resolved for that tensor.
Two executors consume plans: the streaming one (``merge-yaml``: read, merge, write, one tensor
at a time) and the in-memory one (evolve: inputs loaded once, many plans merged into one model).
Neither executor knows anything about YAML, slices, gradients or filters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge_core.kernels.inputs import TensorParams


@dataclass(frozen=True)
class InputModel:
    """One input model as the recipe names it, and where it lives on disk."""

    reference: str  # as written in the recipe (hub id, maybe with @revision, or a path)
    path: Path  # resolved local directory (of the base model, for a 'base+adapter' reference)
    config: dict[str, Any]  # its config.json
    adapter: Any = None  # merge_core.lora.LoraAdapter merged into it when read ('base+adapter'), or None

    @property
    def source(self) -> tuple[Path, Any]:
        """What its tensors are read from: (folder, adapter), for :func:`merge_core.lora.open_checkpoint`."""
        return Path(self.path), self.adapter


@dataclass(frozen=True)
class TensorSource:
    """Tensor ``tensor`` of input model ``model`` (an index into ``MergePlan.models``)."""

    model: int
    tensor: str


@dataclass(frozen=True)
class TensorTask:
    """How to make one output tensor.

    ``sources`` are aligned with ``params.per_model``; ``base_index`` indexes ``sources``.
    ``method`` is a registry name (``passthrough`` for copies of a single source).
    ``seed`` seeds the randomized methods for this tensor (derived from the run seed and the
    output name, so results do not depend on the order tensors are processed in).
    """

    output: str
    sources: tuple[TensorSource, ...]
    base_index: int | None
    method: str
    params: TensorParams
    seed: int | None = None
    # The axis indexed by token ids, when the inputs are first re-indexed to the plan's output
    # vocabulary (MergePlan.vocabulary; merge_core.vocabulary.align_rows), else None.
    vocab_axis: int | None = None


@dataclass
class MergePlan:
    """Everything needed to produce the merged model, minus the tensor data."""

    models: list[InputModel]
    tasks: list[TensorTask]
    out_config: dict[str, Any]  # config.json of the result (num_hidden_layers, dtype updated)
    dtype: torch.dtype | None  # dtype the inputs are cast to before merging (recipe `dtype`)
    out_dtype: torch.dtype | None  # dtype of the written tensors (recipe `out_dtype` or `dtype`)
    tokenizer_source: str | None = None  # "base", "union" or a model reference
    chat_template: str | None = None
    base_model: int | None = None  # index into ``models``
    extra: dict[str, Any] = field(default_factory=dict)
    vocabulary: Any = None  # merge_core.vocabulary.OutputVocabulary of a merged tokenizer, or None

    def aligned(self, task: TensorTask, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """``task``'s inputs re-indexed to the output vocabulary when it has one and the task
        is token-indexed; else ``tensors`` as they are."""
        if self.vocabulary is None or task.vocab_axis is None:
            return tensors
        from merge_core.vocabulary import align_rows

        refs = [self.models[s.model].reference for s in task.sources]
        done = align_rows(self.vocabulary, dict(zip(refs, tensors)), task.vocab_axis)
        return [done[ref] for ref in refs]

    def output_shape(self, task: TensorTask, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of ``task``'s result, given its first input's ``shape``."""
        if self.vocabulary is None or task.vocab_axis is None:
            return tuple(shape)
        out = list(shape)
        out[task.vocab_axis] = self.vocabulary.size
        return tuple(out)
