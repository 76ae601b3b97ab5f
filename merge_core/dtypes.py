"""Dtype names and the torch dtypes they stand for, in one place.

Three vocabularies meet here:

* recipe names (mergekit's ``dtype`` / ``out_dtype``): :data:`RECIPE_DTYPES`, optionally
  written with a ``torch.`` prefix (``torch.bfloat16``), as mergekit accepts them;
* evaluation spellings (``--eval-dtype``, lm-eval / vLLM style): :data:`DTYPE_ALIASES` maps
  ``bf16``, ``fp16``, ``half``, ``fp32`` and ``float`` to recipe names;
* safetensors header codes (``BF16``, ``F32``...): :data:`SAFETENSORS_NAMES`.

Importing this module does not import torch (configuration validation uses the names alone);
the functions that return torch dtypes import it when called.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

RECIPE_DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32", "float64")
"""The ``dtype`` / ``out_dtype`` values a recipe accepts (each also with a ``torch.`` prefix)."""

DTYPE_ALIASES: Mapping[str, str] = MappingProxyType({
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
})
"""Evaluation spellings -> recipe names (recipes themselves accept only :data:`RECIPE_DTYPES`)."""

SAFETENSORS_NAMES: Mapping[str, str] = MappingProxyType({
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "I32": "int32", "U32": "uint32", "I64": "int64", "U64": "uint64",
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
})  # fmt: skip
"""safetensors header dtype code -> torch attribute name (the codes this engine reads and writes)."""


def canonical_name(name: str, *, aliases: bool = False) -> str:
    """The recipe name of ``name``: ``"torch.bfloat16"`` -> ``"bfloat16"``; with ``aliases``
    also ``"bf16"`` -> ``"bfloat16"`` (see :data:`DTYPE_ALIASES`).

    Raises KeyError for anything else.
    """
    bare = name.removeprefix("torch.")
    if bare in RECIPE_DTYPES:
        return bare
    if aliases and name in DTYPE_ALIASES:
        return DTYPE_ALIASES[name]
    raise KeyError(name)


def torch_dtype(name: str | None, *, aliases: bool = False) -> torch.dtype | None:
    """``"bfloat16"`` (or ``"torch.bfloat16"``; with ``aliases`` also ``"bf16"``...) ->
    ``torch.bfloat16``; None stays None.  KeyError for a name :func:`canonical_name` refuses."""
    if name is None:
        return None
    import torch

    return getattr(torch, canonical_name(name, aliases=aliases))


@functools.cache
def safetensors_dtypes() -> Mapping[str, torch.dtype]:
    """safetensors code -> torch dtype, for the codes this torch build has a dtype for (older
    builds lack uint16 and some float8 variants)."""
    import torch

    return MappingProxyType(
        {code: getattr(torch, name) for code, name in SAFETENSORS_NAMES.items() if hasattr(torch, name)}
    )


@functools.cache
def safetensors_codes() -> Mapping[torch.dtype, str]:
    """torch dtype -> safetensors code (the inverse of :func:`safetensors_dtypes`)."""
    return MappingProxyType({dtype: code for code, dtype in safetensors_dtypes().items()})
