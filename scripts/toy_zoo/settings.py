"""Build settings of the toy zoo and the cache key (stamp) derived from them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

from .tasks import DATA_DIR, EVAL_TASKS_DIR

PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ZooSettings:
    """Everything that shapes the zoo besides the seed (all of it goes into the cache key)."""

    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 344
    max_len: int = 256
    batch_size: int = 32
    base_steps: int = 150
    base_lr: float = 3e-3
    expert_lr: float = 2e-3
    # (steps, batch) per expert: arithmetic prompts are ~10 tokens, spatial ~50, so arithmetic
    # gets a larger batch for the same cost.
    spatial_plan: tuple[int, int] = (200, 32)
    arith_plan: tuple[int, int] = (300, 128)
    format_plan: tuple[int, int] = (150, 32)
    # Which tensors each expert may change (regex on parameter names; "" = all).
    spatial_train: str = r"self_attn"
    arith_train: str = r""
    format_train: str = r"lm_head|model\.norm|embed_tokens"
    replay_batch: int = 8  # base-corpus docs per expert step, to keep experts near the base off-task
    replay_weight: float = 1.0
    tokenizer_docs: int = 2000
    threads: int = 2
    evaluate: bool = True
    eval_batch_size: int = 64
    grid: tuple[float, ...] = field(default=(0.0, 0.75, 1.5))
    grid_limit: int | None = 60  # docs per task when scoring grid points (speed)


    def expert_plan(self, skill: str) -> tuple[int, int]:
        """(steps, batch size) of one expert's fine-tuning."""
        return getattr(self, f"{skill}_plan")

    def expert_trainable(self, skill: str) -> str:
        """Regex of the parameter names one expert fine-tunes ("" = all)."""
        return getattr(self, f"{skill}_train")


def code_fingerprint() -> str:
    """Hash of the zoo code, the toy task files and the library versions that shape the output."""
    h = hashlib.sha256()
    files = sorted(PACKAGE_DIR.glob("*.py")) + sorted(EVAL_TASKS_DIR.glob("*.py")) \
        + sorted(EVAL_TASKS_DIR.glob("toy_*.yaml")) + sorted(DATA_DIR.glob("toy_*.jsonl"))
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for dist in ("torch", "transformers", "tokenizers", "safetensors", "lm_eval"):
        h.update(f"{dist}={version(dist)}\0".encode())
    return h.hexdigest()


def stamp_for(seed: int, settings: ZooSettings) -> dict:
    """The stamp a finished build writes: its key changes with seed, settings or code."""
    payload = {"seed": seed, "settings": asdict(settings), "code": code_fingerprint()}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return {"key": key, **payload}
