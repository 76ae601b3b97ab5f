"""The same toy zoo on every x86-64 CPU: pin torch's (and MKL's) vector code path before torch loads.

torch picks its element-wise kernels by the CPU's instruction set (``ATEN_CPU_CAPABILITY``) and MKL
its BLAS path likewise; AVX-512 kernels round differently from AVX2 ones, and a zoo trained on an
AVX-512 machine came out measurably different (same seed: the toy search's best 0.53 instead of
0.647, below the demo's bar). Pinned to AVX2, which every x86-64 machine this runs on has, an
AVX-512 machine builds the byte-identical zoo (checked: same accuracy matrix, same search result).
oneDNN (torch's ``mkldnn``) also picks its kernels by the CPU, AVX-512 and AMX included: it is
pinned too.  The fp32 build runs no oneDNN primitive with this torch (checked with
``torch.backends.mkldnn.verbose``: none in training or scoring; it serves bf16 matmuls), so the
pin changes no byte today; it keeps an AMX machine on the same kernels should a torch route
fp32 work through oneDNN.  (``DNNL_MAX_CPU_ISA`` is the variable's older name.)
This module must not import torch: the variables are read when torch first dispatches.
"""

from __future__ import annotations

import os
import platform

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
          "DNNL_MAX_CPU_ISA": "AVX2"}


def pinned_env() -> dict[str, str]:
    """The variables to set (on x86-64; nothing elsewhere). Values already set are kept."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    return {k: os.environ.get(k, v) for k, v in PINNED.items()}


def pin_vector_isa() -> None:
    """Set :func:`pinned_env` in this process (call before importing torch)."""
    os.environ.update(pinned_env())
