"""Per-tensor caches in ``TensorInputs.cache``: derived data kept between calls.

Keys are strings ``"<kind>:<...>:<model>"``; what may be cached, and for how long, is described
on :class:`~merge_core.kernels.inputs.TensorInputs`.  The task-arithmetic family, whose caches
hold per-call data (random fields, ranks), clears them after every one-shot call
(``MethodBase.clear_one_shot_cache``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from merge_core.kernels.inputs import TensorInputs

T = TypeVar("T")


def cached(inputs: TensorInputs, key: str, build: Callable[[], T]) -> T:
    """``build()``, kept in ``inputs.cache`` under ``key`` (data that depends on the tensors only)."""
    if key not in inputs.cache:
        inputs.cache[key] = build()
    return inputs.cache[key]


def cached_for_seed(inputs: TensorInputs, key: str, seed: Any, build: Callable[[], T]) -> T:
    """``build()``, kept in ``inputs.cache`` under ``key`` for as long as calls pass the same
    ``seed`` (random draws and what is derived from them; any comparable version tag)."""
    hit = inputs.cache.get(key)
    if hit is None or hit[0] != seed:
        hit = inputs.cache[key] = (seed, build())
    return hit[1]


def drop(inputs: TensorInputs, match: Callable[[str], bool]) -> None:
    """Forget the cached entries whose key ``match``es (a packed or derived form replaces them;
    they are rebuilt on demand)."""
    for key in [k for k in inputs.cache if match(k)]:
        del inputs.cache[key]
