"""The streaming executor behind ``merge-yaml``: read, merge, write, one tensor at a time.

Peak memory is one tensor per input model plus the writer's shard buffer, never whole models,
so merging three 7B checkpoints fits in a few GB of RAM.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_core.errors import ModelError
from merge_core.methods import get_method
from merge_core.methods.base import TensorInputs
from merge_core.model_card import render_model_card
from merge_core.plan_types import MergePlan, TensorTask
from merge_core.tensor_io import CheckpointReader
from merge_core.writer import ShardedModelWriter, copy_tokenizer_files


@dataclass(frozen=True)
class MergeOptions:
    """Knobs of a streaming merge (the ``merge-yaml`` flags that change the result or its files)."""

    device: str = "cpu"
    out_shard_size: int = 5_000_000_000
    copy_tokenizer: bool = True
    write_model_card: bool = True
    show_progress: bool = False


def merge_tensor(
    task: TensorTask,
    tensors: list[torch.Tensor],
    *,
    out: torch.Tensor | None = None,
    inputs: TensorInputs | None = None,
) -> torch.Tensor:
    """Run ``task``'s method on ``tensors`` (one per source), seeded for randomized methods.

    ``inputs`` may carry a warm cache from an earlier call with the same tensors (evolve loop).
    """
    method = get_method(task.method)
    if inputs is None:
        inputs = TensorInputs(task.output, tensors, task.base_index)
    generator = None
    if method.randomized:
        generator = torch.Generator(device=tensors[0].device)
        generator.manual_seed(task.seed if task.seed is not None else 0)
    return method.merge(inputs, task.params, out=out, generator=generator)


def _tokenizer_dir(plan: MergePlan) -> Path | None:
    """The model whose tokenizer the output gets: ``tokenizer_source`` or the base (else first)."""
    source = plan.tokenizer_source
    if source in (None, "base", "union"):
        index = plan.base_model if plan.base_model is not None else 0
        return plan.models[index].path if plan.models else None
    for model in plan.models:
        if model.reference == source:
            return model.path
    raise ModelError(f"tokenizer_source: '{source}' is not one of the merged models")


def _written_dtype(plan: MergePlan, result: torch.Tensor, first_input: torch.Tensor) -> torch.dtype:
    return plan.out_dtype or plan.dtype or first_input.dtype


def iter_merged_tensors(
    plan: MergePlan, readers: dict[int, CheckpointReader], device: str
) -> Iterable[tuple[str, torch.Tensor]]:
    """Yield ``(name, merged tensor)`` for every task of ``plan``, reading inputs lazily."""
    for task in plan.tasks:
        tensors = [
            readers[s.model].get(s.tensor, dtype=plan.dtype, device=device) for s in task.sources
        ]
        result = merge_tensor(task, tensors)
        yield task.output, result.to(_written_dtype(plan, result, tensors[0])).cpu()


def run_merge(plan: MergePlan, out_dir: Path, recipe_yaml: str, options: MergeOptions) -> Path:
    """Merge ``plan`` into ``out_dir`` (written to a temp dir, renamed into place at the end)."""
    with ExitStack() as stack:
        readers = {
            i: stack.enter_context(CheckpointReader(model.path)) for i, model in enumerate(plan.models)
        }
        writer = stack.enter_context(ShardedModelWriter(out_dir, options.out_shard_size))
        merged = iter_merged_tensors(plan, readers, options.device)
        if options.show_progress:
            from tqdm import tqdm

            merged = tqdm(merged, total=len(plan.tasks), desc="merging", unit="tensor")
        for name, tensor in merged:
            writer.add(name, tensor)

        config = dict(plan.out_config)
        written = plan.out_dtype or plan.dtype
        if written is not None:
            config["torch_dtype"] = str(written).removeprefix("torch.")
        writer.write_text("config.json", json.dumps(config, indent=2) + "\n")
        tokenizer_dir = _tokenizer_dir(plan)
        if options.copy_tokenizer and tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, writer)
        if plan.chat_template:
            _write_chat_template(writer, plan.chat_template)
        writer.write_text("mergekit_config.yml", recipe_yaml)
        if options.write_model_card:
            base = plan.models[plan.base_model].reference if plan.base_model is not None else None
            card = render_model_card(
                recipe_yaml, [m.reference for m in plan.models], _method_name(plan), base
            )
            writer.write_text("README.md", card)
        writer.finalize()
    return out_dir


def _method_name(plan: MergePlan) -> str:
    methods = {t.method for t in plan.tasks if t.method != "passthrough"}
    return plan.extra.get("merge_method") or (methods.pop() if len(methods) == 1 else "passthrough")


def _write_chat_template(writer: ShardedModelWriter, template: str) -> None:
    """Store a custom chat template the way transformers reads it (chat_template.jinja)."""
    writer.write_text("chat_template.jinja", template)
