"""The JSON files of a model directory: ``config.json`` and the sharded-checkpoint index.

One reader each, for the planner (:mod:`~merge_core.model_ref`, which names the model reference
in its errors) and the tensor reader (:mod:`~merge_core.tensor_io`, which names the file).
No torch here: planning and configuration checks read these files without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from merge_core.errors import ModelError, one_line

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _prefix(reference: str | None) -> str:
    return f"'{reference}': " if reference else ""


def load_config(model_dir: Path | str, reference: str | None = None) -> dict[str, Any]:
    """The ``config.json`` of ``model_dir`` as a dict; ModelError naming the file (and the model
    ``reference``, when given) if it is missing, unreadable, not JSON or not a JSON object."""
    who = _prefix(reference)
    file = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise ModelError(f"{who}{model_dir}: model directory does not exist")
    if not file.is_file():
        raise ModelError(f"{who}{file}: not found (every model directory needs a config.json)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"{who}{file}: cannot read ({err})") from None
    except json.JSONDecodeError as err:
        raise ModelError(f"{who}{file}: invalid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{who}{file}: expected a JSON object, got {type(config).__name__}")
    return config


def is_plain_relpath(name: str) -> bool:
    """Whether ``name`` is a path inside the model directory (index entries must not point
    outside it)."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts and "\\" not in name


def read_weight_map(index: Path, reference: str | None = None) -> dict[str, str]:
    """The ``weight_map`` of the sharded-checkpoint index ``index``: tensor name -> shard file
    (relative to the index's directory), in index order.

    Raises ModelError naming the file (and ``reference``, when given) when the index cannot be
    read, its ``weight_map`` is missing or empty, a shard name points outside the directory or
    a shard file is missing.  Whether each shard holds its tensors is the caller's check (it
    reads the shards' headers anyway).
    """
    who = _prefix(reference)
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ModelError(f"{who}{index}: unreadable index ({one_line(err)})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"{who}{index}: 'weight_map' is missing or empty")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not is_plain_relpath(shard):
            raise ModelError(f"{who}{index}: bad shard file name {shard!r} for '{name}'")
    for shard in dict.fromkeys(weight_map.values()):  # each shard once, in index order
        if not (index.parent / shard).is_file():
            raise ModelError(f"{who}{index}: missing shard {shard} (listed in weight_map)")
    return weight_map
