"""The streaming executor behind ``merge-yaml``: read, merge, write, one tensor at a time.

Three stages run concurrently: a reader thread maps the next tasks' input tensors (private
copy-on-write maps of the page cache, page tables filled on that thread), the calling thread
runs the merge math, and the writer's thread writes each result straight to its place in its
output shard.  Peak memory is a few tensors per input model plus two bounded queues
(read-ahead and write-behind, 64 MB each), never whole models, so merging three 7B
checkpoints fits in a few GB of RAM.  Inputs stay in their stored dtype (bf16 in, bf16 out):
methods compute in float32 (chunk by chunk where they can) and write the result into a tensor
of the written dtype, so the executor makes no float32 copy of inputs or results.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Generator
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge_core.errors import ModelError
from merge_core.fsutil import refuse_overwrite
from merge_core.kernels.inputs import TensorInputs
from merge_core.lora import open_checkpoint
from merge_core.methods import get_method
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
    fsync: bool = True  # flush the output to disk before renaming it into place (ShardedModelWriter)


# Bytes of input tensors the reader thread may hold ahead of the merge (at least one task).
READ_AHEAD_BYTES = 64 << 20


def merge_tensor(
    task: TensorTask,
    tensors: list[torch.Tensor],
    *,
    out: torch.Tensor | None = None,
    inputs: TensorInputs | None = None,
) -> torch.Tensor:
    """Run ``task``'s method on ``tensors`` (one per source), seeded for randomized methods.

    ``inputs`` may carry a warm cache from an earlier call with the same tensors (evolve loop);
    without it the method gets one-shot inputs (``reuse=False``: no caches worth building).
    """
    method = get_method(task.method)
    if inputs is None:
        inputs = TensorInputs(task.output, tensors, task.base_index, reuse=False)
    generator = None
    if method.randomized:
        generator = torch.Generator()  # on the CPU whatever the device: the same seeds on a GPU
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


def _write_tokenizer(tokenizer: Any, writer: ShardedModelWriter) -> None:
    """Save a transformers tokenizer into the output (through a scratch folder: the writer
    places every file itself)."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        copy_tokenizer_files(scratch, writer)


def _written_dtype(plan: MergePlan, readers: dict[int, CheckpointReader], task: TensorTask) -> torch.dtype:
    """The dtype ``task``'s result is stored in: recipe ``out_dtype``, else ``dtype``, else the
    first input's own dtype."""
    first = task.sources[0]
    return plan.out_dtype or plan.dtype or readers[first.model].dtype(first.tensor)


def _read_inputs(
    plan: MergePlan, readers: dict[int, CheckpointReader], task: TensorTask, device: str
) -> list[torch.Tensor]:
    tensors = [
        readers[s.model].get(s.tensor, dtype=plan.dtype, device=device, mapped=True)
        for s in task.sources
    ]
    return plan.aligned(task, tensors)  # token-indexed rows onto a merged vocabulary


class _ReadAhead:
    """Iterate ``(task, input tensors)`` over a plan, read by a background thread.

    The thread stays at most :data:`READ_AHEAD_BYTES` of inputs ahead (always at least one
    task); an error while reading is raised in the consuming thread, in task order.  Inputs
    handed back with :meth:`release` are dropped by the thread too: unmapping them costs
    page-table work that would otherwise stall the merge.
    """

    def __init__(
        self, plan: MergePlan, readers: dict[int, CheckpointReader], device: str
    ) -> None:
        self._plan, self._readers, self._device = plan, readers, device
        self._ready: deque[tuple[TensorTask, list[torch.Tensor], int]] = deque()
        self._held = 0  # bytes in _ready
        self._error: BaseException | None = None
        self._done = False
        self._stop = False
        self._released: list[list[torch.Tensor]] = []
        self._cond = threading.Condition()
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._run, name="tensor-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        torch.set_num_threads(self._threads)  # OpenMP settings are per thread
        try:
            for task in self._plan.tasks:
                self._wait_for_room()
                if self._stop:
                    return
                tensors = _read_inputs(self._plan, self._readers, task, self._device)
                size = sum(t.numel() * t.element_size() for t in tensors)
                with self._cond:
                    self._ready.append((task, tensors, size))
                    self._held += size
                    self._cond.notify_all()
                del tensors
        except BaseException as err:  # noqa: BLE001 - re-raised in the consuming thread
            self._error = err
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()
        while not self._stop:  # keep dropping released inputs until the consumer is done
            self._wait_for_room(until_stop=True)

    def _wait_for_room(self, until_stop: bool = False) -> None:
        """Wait until there is room to read ahead (or a stop), dropping released inputs."""
        while True:
            with self._cond:
                while not self._released and not self._stop and (
                    until_stop or (self._ready and self._held >= READ_AHEAD_BYTES)
                ):
                    self._cond.wait()
                released, self._released = self._released, []
            if not released:
                return
            del released  # the unmapping happens here, on this thread

    def release(self, tensors: list[torch.Tensor]) -> None:
        """Hand ``tensors`` (done with) back to the reader thread to be freed there."""
        with self._cond:
            self._released.append(tensors)
            self._cond.notify_all()

    def next(self) -> tuple[TensorTask, list[torch.Tensor]] | None:
        """The next task and its inputs, or None after the last task.

        Not a generator on purpose: a suspended generator frame would keep a reference to the
        inputs and free them on this thread after :meth:`release`.
        """
        with self._cond:
            while not self._ready and not self._done:
                self._cond.wait()
            if not self._ready:
                if self._error is not None:
                    raise self._error
                return None
            task, tensors, size = self._ready.popleft()
            self._held -= size
            self._cond.notify_all()
        return task, tensors

    def close(self) -> None:
        """Stop the reader thread (after its current read) and drop what it read ahead."""
        with self._cond:
            self._stop = True
            self._ready.clear()
            self._cond.notify_all()
        self._thread.join()


def iter_merged_tensors(
    plan: MergePlan, readers: dict[int, CheckpointReader], device: str
) -> Generator[tuple[str, torch.Tensor], None, None]:
    """Yield ``(name, merged tensor)`` for every task of ``plan``, in its written dtype.

    Inputs are read ahead by a background thread; results are merged straight into a tensor
    of the written dtype (no full-size float32 copy of the result and no separate cast).
    """
    reader = _ReadAhead(plan, readers, device)
    try:
        while (item := reader.next()) is not None:
            task, tensors = item
            del item
            dtype = _written_dtype(plan, readers, task)
            out = None
            if dtype.is_floating_point and dtype != torch.float32:
                # Narrower than the float32 math: methods write each finished chunk into it.
                out = torch.empty(tensors[0].shape, dtype=dtype, device=tensors[0].device)
            result = merge_tensor(task, tensors, out=out)
            reader.release(tensors)
            del tensors
            yield task.output, result.to(dtype).cpu()
    finally:
        reader.close()


def run_merge(plan: MergePlan, out_dir: Path, recipe_yaml: str, options: MergeOptions) -> Path:
    """Merge ``plan`` into ``out_dir`` (written to a temp dir, renamed into place at the end).

    ``out_dir`` is replaced whole: a MergeError, before anything is written, when it is, is
    inside or contains an input model's folder (the tokenizer source is one of them).
    """
    protected = [(f"the input model '{m.reference}'", m.path) for m in plan.models]
    protected += [(f"the adapter of '{m.reference}'", m.adapter.path) for m in plan.models if m.adapter is not None]
    refuse_overwrite(out_dir, protected, "the output directory")
    with ExitStack() as stack:
        readers = {
            i: stack.enter_context(open_checkpoint(*model.source)) for i, model in enumerate(plan.models)
        }
        writer = stack.enter_context(ShardedModelWriter(out_dir, options.out_shard_size, fsync=options.fsync))
        # Announcing every output tensor lets the writer stream each one to its final place
        # in its shard instead of holding a whole shard (up to 5 GB) in memory.
        writer.declare(
            (t.output, _written_dtype(plan, readers, t), plan.output_shape(t, _source_shape(readers, t)))
            for t in plan.tasks
        )
        # Closed (stopping the read-ahead thread) before the readers' files, even on errors.
        merged = stack.enter_context(closing(iter_merged_tensors(plan, readers, options.device)))
        if options.show_progress:
            from tqdm import tqdm

            merged = tqdm(merged, total=len(plan.tasks), desc="merging", unit="tensor")
        for name, tensor in merged:
            writer.add(name, tensor)
            del tensor

        config = dict(plan.out_config)
        written = plan.out_dtype or plan.dtype
        if written is not None:
            config["torch_dtype"] = str(written).removeprefix("torch.")
        writer.write_text("config.json", json.dumps(config, indent=2) + "\n")
        tokenizer_dir = _tokenizer_dir(plan)
        if plan.vocabulary is not None:  # the merged vocabulary's tokenizer, always (as mergekit)
            _write_tokenizer(plan.vocabulary.tokenizer, writer)
        elif options.copy_tokenizer and tokenizer_dir is not None:
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


def _source_shape(readers: dict[int, CheckpointReader], task: TensorTask) -> tuple[int, ...]:
    """Shape of ``task``'s result: the planner checked that all its sources agree."""
    first = task.sources[0]
    return readers[first.model].shape(first.tensor)


def _method_name(plan: MergePlan) -> str:
    methods = {t.method for t in plan.tasks if t.method != "passthrough"}
    return plan.extra.get("merge_method") or (methods.pop() if len(methods) == 1 else "passthrough")


def _write_chat_template(writer: ShardedModelWriter, template: str) -> None:
    """Store a custom chat template the way transformers reads it (chat_template.jinja)."""
    writer.write_text("chat_template.jinja", template)
