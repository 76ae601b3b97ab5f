"""LoRA adapters as inputs: ``base_model+path/to/adapter`` reads as the base with the adapter merged.

mergekit's syntax: a model reference ``A+B`` is model ``A`` with the LoRA adapter ``B`` (a folder
with ``adapter_config.json`` and ``adapter_model.safetensors``, or a hub id) merged into it.  Where
mergekit merges the adapter with PEFT into a cache folder before merging, here it is added when a
tensor is read (:class:`LoraReader`, same interface as the checkpoint reader): no folder is
written, and an evolve worker that keeps its inputs resident pays for it once, never per
candidate.

PEFT's semantics (``merge_and_unload``): a targeted linear weight ``W`` (out x in) becomes
``W + B @ A * scaling`` with ``A`` (r x in), ``B`` (out x r) and ``scaling = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with ``use_rslora``; ``rank_pattern``/``alpha_pattern`` override r and
alpha per module), transposed for ``fan_in_fan_out`` (GPT-2's Conv1D); an embedding gets
``(B @ A).T * scaling`` from ``lora_embedding_A``/``lora_embedding_B``.  Tensors saved whole in
the adapter (``modules_to_save``, trained biases) replace the base's.  The sum is computed in
float32 and stored in the base tensor's dtype (or ``lora_merge_dtype``).  DoRA and adapter types
other than LoRA are refused in one line; so is an adapter tensor the base has no place for, or
one whose shape does not fit it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge_core.errors import ModelError
from merge_core.tensor_io import CheckpointReader

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LoraAdapter", "LoraDelta", "LoraReader", "load_adapter",
           "open_checkpoint", "split_lora_ref"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT saves module names under the wrapped model
_LORA_SUFFIXES = {  # adapter tensor suffix -> (factor, embedding?)
    ".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True),
}


def split_lora_ref(ref: str) -> tuple[str, str | None]:
    """``"base+adapter"`` -> (``"base"``, ``"adapter"``); a reference without ``+`` -> (ref, None)."""
    if "+" not in ref:
        return ref, None
    base, adapter = ref.split("+", 1)
    if not base.strip() or not adapter.strip():
        raise ModelError(f"'{ref}': expected 'base_model+adapter' (both parts non-empty)")
    if "+" in adapter:
        raise ModelError(f"'{ref}': one adapter per model reference ('base_model+adapter')")
    return base, adapter


@dataclass(frozen=True)
class LoraDelta:
    """How one base tensor changes: its A and B tensors in the adapter file and the scale."""

    a_key: str
    b_key: str
    scaling: float
    transpose: bool  # fan_in_fan_out, or an embedding: (B @ A).T


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter matched against its base model's tensors."""

    reference: str
    path: Path
    merge_dtype: torch.dtype | None = None  # the changed tensors' dtype (None: the base tensor's)
    # What it changes, derived from the files above (equal adapters: equal path and dtype).
    deltas: dict[str, LoraDelta] = field(default_factory=dict, compare=False)  # base tensor -> its delta
    replacements: dict[str, str] = field(default_factory=dict, compare=False)  # base tensor -> adapter tensor


def _read_config(path: Path, ref: str) -> dict[str, Any]:
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise ModelError(f"'{ref}': {path} is not a LoRA adapter (no {ADAPTER_CONFIG})")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelError(f"'{ref}': cannot read {file} ({err})") from None
    if not isinstance(config, dict):
        raise ModelError(f"'{ref}': {file} is not a JSON object")
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise ModelError(f"'{ref}': a {kind} adapter; only LoRA adapters (peft_type LORA) can be merged")
    if config.get("use_dora"):
        raise ModelError(f"'{ref}': a DoRA adapter (use_dora: true); DoRA's magnitude vectors are not supported, "
                         "merge it with PEFT's merge_and_unload first")
    if config.get("lora_bias"):
        raise ModelError(f"'{ref}': an adapter with lora_bias (a bias on lora_B) is not supported")
    return config


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override: the first pattern that matches the end of ``module``."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", module):
            return value
    return default


def load_adapter(ref: str, path: Path, base: dict[str, tuple[int, ...]],
                 merge_dtype: torch.dtype | None = None) -> LoraAdapter:
    """Read the adapter at ``path`` and match it to ``base`` (tensor name -> shape).

    Raises ModelError naming ``ref`` when the adapter is not a usable LoRA adapter of that base.
    """
    config = _read_config(path, ref)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickles = sorted(p.name for p in path.glob("adapter_model*.bin"))
        why = f"only {pickles[0]} (pickles are refused: loading them can run code)" if pickles else "none found"
        raise ModelError(f"'{ref}': no {ADAPTER_WEIGHTS} in {path} ({why})")
    with CheckpointReader(weights) as reader:
        shapes = {name: reader.shape(name) for name in reader.names()}
    factors: dict[str, dict[str, str]] = {}
    embedding: dict[str, bool] = {}
    replacements: dict[str, str] = {}
    for key in shapes:
        if not key.startswith(PREFIX):
            raise ModelError(f"'{ref}': adapter tensor '{key}' is not under '{PREFIX}' (not a PEFT LoRA adapter)")
        # A targeted embedding's own weights are saved too (PEFT's save_embedding_layers): as
        # '<module>.base_layer.weight', replacing the base's before the delta is added.
        name = key[len(PREFIX):].replace(".base_layer.", ".")
        suffix = next((s for s in _LORA_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            if name not in base:
                raise ModelError(f"'{ref}': adapter tensor '{key}' replaces '{name}', which the base model lacks")
            replacements[name] = key
            continue
        module = name[: -len(suffix)]
        which, is_embedding = _LORA_SUFFIXES[suffix]
        factors.setdefault(module, {})[which] = key
        embedding[module] = is_embedding
    deltas: dict[str, LoraDelta] = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise ModelError(f"'{ref}': module '{module}' has lora_{'A' if 'A' in pair else 'B'} but not its partner")
        target = f"{module}.weight"
        if target not in base:
            raise ModelError(f"'{ref}': the adapter targets '{module}', but the base model has no tensor '{target}'")
        a, b = shapes[pair["A"]], shapes[pair["B"]]
        rank = _pattern_value(config.get("rank_pattern"), module, config.get("r", a[0]))
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", rank))
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] != rank:
            raise ModelError(f"'{ref}': '{module}' has lora_A {list(a)} and lora_B {list(b)}, not rank {rank}")
        transpose = embedding[module] or bool(config.get("fan_in_fan_out"))
        product = (a[1], b[0]) if transpose else (b[0], a[1])
        if tuple(base[target]) != product:
            raise ModelError(f"'{ref}': the adapter's '{module}' makes a {list(product)} update, but the base "
                             f"model's '{target}' is {list(base[target])}: not an adapter of this base model")
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        deltas[target] = LoraDelta(pair["A"], pair["B"], float(scaling), transpose)
    if not deltas and not replacements:
        raise ModelError(f"'{ref}': the adapter holds no LoRA weights")
    return LoraAdapter(ref, path, merge_dtype, deltas, replacements)


class LoraReader:
    """The base checkpoint with an adapter merged in: :class:`CheckpointReader`'s interface.

    A tensor the adapter changes is computed when read (``base + B @ A * scaling`` in float32,
    stored as the base tensor's dtype, or ``merge_dtype``); every other one is the base's, mapped
    or read as usual.
    """

    def __init__(self, base_dir: Path, adapter: LoraAdapter) -> None:
        self.path = Path(base_dir)
        self.base = CheckpointReader(base_dir)
        self.weights = CheckpointReader(adapter.path / ADAPTER_WEIGHTS)
        self.adapter = adapter
        self.merge_dtype = adapter.merge_dtype

    def _changed(self, name: str) -> bool:
        return name in self.adapter.deltas or name in self.adapter.replacements

    def names(self) -> list[str]:
        """Tensor names of the base model."""
        return self.base.names()

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name`` (the base's: an adapter never reshapes a tensor)."""
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        """The dtype :meth:`read` returns ``name`` in."""
        if self._changed(name) and self.merge_dtype is not None:
            return self.merge_dtype
        return self.base.dtype(name)

    def nbytes(self, name: str) -> int:
        """Size of ``name`` as read, in bytes."""
        return self.dtype(name).itemsize * math.prod(self.shape(name))

    def total_bytes(self) -> int:
        """Size of all tensors as read, in bytes."""
        return sum(self.nbytes(name) for name in self.names())

    def files(self) -> list[Path]:
        """The safetensors files read: the base's and the adapter's."""
        return [*self.base.files(), *self.weights.files()]

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` with the adapter merged, in freshly allocated memory."""
        replaced = self.adapter.replacements.get(name)
        original = self.weights.read(replaced) if replaced is not None else self.base.read(name)
        delta = self.adapter.deltas.get(name)
        if delta is None:
            return original.to(self.dtype(name))
        a = self.weights.read(delta.a_key).to(torch.float32)
        b = self.weights.read(delta.b_key).to(torch.float32)
        update = b @ a
        if delta.transpose:
            update = update.T
        return original.to(torch.float32).add_(update, alpha=delta.scaling).to(self.dtype(name))

    def mappable(self, name: str) -> bool:
        """Whether :meth:`map` maps ``name`` (never a tensor the adapter changes: it is computed)."""
        return not self._changed(name) and self.base.mappable(name)

    def map(self, name: str) -> torch.Tensor:
        """The base's map of ``name`` where the adapter leaves it, else :meth:`read`."""
        return self.base.map(name) if not self._changed(name) else self.read(name)

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", *,
            mapped: bool = False) -> torch.Tensor:
        """As :meth:`CheckpointReader.get`: ``name`` cast to ``dtype`` on ``device``, the caller's."""
        if not self._changed(name):
            return self.base.get(name, dtype, device, mapped=mapped)
        tensor = self.read(name)
        return tensor.to(dtype=dtype or tensor.dtype, device=torch.device(device))

    def close(self) -> None:
        """Close both checkpoints' files."""
        self.base.close()
        self.weights.close()

    def __enter__(self) -> "LoraReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoraReader({str(self.path)!r} + {str(self.adapter.path)!r})"


def open_checkpoint(path: Path, adapter: LoraAdapter | None = None) -> CheckpointReader | LoraReader:
    """The reader of an input model: its checkpoint, with ``adapter`` merged in when it has one
    (``InputModel.source`` / ``ModelInfo.source`` give both)."""
    return CheckpointReader(path) if adapter is None else LoraReader(path, adapter)
