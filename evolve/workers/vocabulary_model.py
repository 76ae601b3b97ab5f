"""An evolve worker's model for a run that merges vocabularies (``genome.tokenizer_source``).

Every candidate of such a run has the run's merged vocabulary (its rows re-indexed by token,
:mod:`merge_core.vocabulary`), which is not the evaluated model's own.  The worker loads that
model once with the merged vocabulary: a scratch folder holding its config (``vocab_size`` set),
the merged tokenizer, and links to its weight files; transformers sizes the token-indexed tensors
to the config (``resized_vocabulary``), and each evaluation writes every weight first.  vLLM's
engine is started from the same folder with placeholder weights (its weights are pushed whole,
:func:`evolve.evaluation.vllm.engine_kwargs`); the links give the checkpoint's tensor names.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["is_own_vocabulary", "vocabulary_model_dir"]


def is_own_vocabulary(vocabulary: Any, ref: str) -> bool:
    """Whether the merged ``vocabulary`` is model ``ref``'s own (same tokens, ids and rows)."""
    rows = vocabulary.rows.get(ref)
    return rows is not None and vocabulary.size == len(rows) and rows == list(range(len(rows)))


def vocabulary_model_dir(model_dir: Path, vocabulary: Any) -> Path:
    """A scratch folder: ``model_dir``'s config with the merged ``vocab_size``, the merged
    tokenizer and links to ``model_dir``'s weights.  The caller removes it when done."""
    scratch = Path(tempfile.mkdtemp(prefix="merge-evolve-vocabulary-"))
    for entry in model_dir.iterdir():
        if entry.suffix == ".safetensors" or entry.name.endswith(".safetensors.index.json"):
            os.symlink(entry.resolve(), scratch / entry.name)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config["vocab_size"] = vocabulary.size
    (scratch / "config.json").write_text(json.dumps(config, indent=2))
    vocabulary.tokenizer.save_pretrained(str(scratch))
    return scratch
