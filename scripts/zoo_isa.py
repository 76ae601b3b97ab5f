"""The same toy zoo on every x86-64 CPU: pin torch's (and MKL's) vector code path before torch loads.

torch picks its element-wise kernels by the CPU's instruction set (``ATEN_CPU_CAPABILITY``) and MKL
its BLAS path likewise; AVX-512 kernels round differently from AVX2 ones, and a zoo trained on an
AVX-512 machine came out measurably different (same seed: the toy search's best 0.53 instead of
0.647, below the demo's bar). Pinned to AVX2, which every x86-64 machine this runs on has, an
AVX-512 machine builds the byte-identical zoo (checked: same accuracy matrix, same search result).
MKL also picks its blocking by the CPU model (cache sizes), which changes the order of the sums
within the same instruction set: ``MKL_CBWR=AVX2`` (its "conditional numerical reproducibility")
makes its results the same on every CPU with AVX2.  oneDNN (torch's ``mkldnn``) picks its kernels
by the CPU too, AVX-512 and AMX included: it is pinned as well (``DNNL_MAX_CPU_ISA`` is the
variable's older name).  Checked on this project's AVX-512 machine (no AMX): the fp32 build runs
MKL's SGEMM for its matmuls and no oneDNN primitive (``MKL_VERBOSE``, ``torch.backends.mkldnn.
verbose``), and neither ``MKL_CBWR`` nor the oneDNN pin changes a byte there (12 training steps of
the zoo's model, hashed); ATen's AVX-512 kernels do.  A zoo built on an AVX-512 + AMX
machine before these two pins differed from this machine's (issue 29); that the pins make them
equal is not yet checked on such a machine.
This module must not import torch: the variables are read when torch first dispatches.
"""

from __future__ import annotations

import os
import platform

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "MKL_CBWR": "AVX2",
          "ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}


def pinned_env() -> dict[str, str]:
    """The variables to set (on x86-64; nothing elsewhere). Values already set are kept."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    return {k: os.environ.get(k, v) for k, v in PINNED.items()}


def pin_vector_isa() -> None:
    """Set :func:`pinned_env` in this process (call before importing torch)."""
    os.environ.update(pinned_env())
