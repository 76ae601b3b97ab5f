"""C helpers for the in-memory merger's per-candidate lookups, compiled on first use.

Some per-candidate work is a few hundred thousand dependent memory reads that PyTorch ops run
one binary search at a time (DELLA's kept-L1 lookup: one search per rank group and tensor),
so every read waits for the previous one.  Here the same searches run in C, in passes whose
reads are independent and prefetched ahead, with a fence level that leaves one cache line of
each search to a random read.  The source is compiled with the system C compiler (the one ``torch.compile``'s
CPU backend uses too) into a per-user cache directory, once per source version, and loaded with
:mod:`ctypes` (a plain C function needs no torch headers: it builds in well under a second,
where ``torch.utils.cpp_extension`` would compile against them for tens of seconds per worker).
Without a compiler, or with ``MERGE_CORE_NATIVE=0``, callers use their PyTorch
path; both give the same numbers (the C code rounds exactly as the PyTorch ops do:
``-ffp-contract=off``, float32 operands).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

FENCE = 32  # draws per fence block: one 64-byte cache line of int16

_SOURCE = r"""
#include <stdint.h>
#include <math.h>

enum { B = FENCE, AHEAD = 24, BATCH = 4096 };

/* Sum over rank groups k of cum[k][c_k], c_k = #{draws[k][.] <= t_k}, t_k the largest draw u
   with u - pos[k] * b <= a in float32 (a an integer), as DellaLookup.thresholds computes it.
   draws: [L][R] int16, each row sorted; fences: [L][F] with fences[k][j] = draws[k][j * B];
   cum: [L][R + 1] float32 (zero-led running sums).
   Three passes over a batch of groups, so that the random reads of one pass are independent
   and prefetched AHEAD groups early: fences (read in order) give each group's block, the
   block (one cache line) gives the count, the count gives the running sum. */
double della_kept(const int16_t* draws, const int16_t* fences, const float* cum, const float* pos,
                  int64_t L, int64_t R, int64_t F, float a, float b) {
    int32_t t[BATCH];
    int64_t count[BATCH];
    double total = 0.0;
    for (int64_t k0 = 0; k0 < L; k0 += BATCH) {
        int64_t n = L - k0 < BATCH ? L - k0 : BATCH;
        for (int64_t i = 0; i < n; i++) {
            float c = pos[k0 + i] * b;
            float p = floorf(c) + a;
            if ((p + 1.0f) - c <= a) p += 1.0f;  /* where float32 rounding of u - c says so */
            if (p - c > a) p -= 1.0f;
            if (p > 32767.0f) p = 32767.0f;
            int32_t ti = (int32_t)p;
            t[i] = ti;
            const int16_t* fence = fences + (k0 + i) * F;
            const int16_t* at = fence;
            for (int64_t len = F; len > 1;) {  /* branchless lower bound */
                int64_t half = len >> 1;
                at = (at[half - 1] <= ti) ? at + half : at;
                len -= half;
            }
            count[i] = (at - fence) + (at[0] <= ti);  /* fences <= t; 0: every draw > t */
        }
        for (int64_t i = 0; i < n; i++) {
            if (i + AHEAD < n && count[i + AHEAD] > 0)
                __builtin_prefetch(draws + (k0 + i + AHEAD) * R + (count[i + AHEAD] - 1) * B);
            int64_t j = count[i];
            if (j == 0) continue;
            const int16_t* row = draws + (k0 + i) * R;
            const int16_t* at = row + (j - 1) * B;
            int64_t len = (j * B < R ? j * B : R) - (j - 1) * B;
            for (; len > 1;) {
                int64_t half = len >> 1;
                at = (at[half - 1] <= t[i]) ? at + half : at;
                len -= half;
            }
            count[i] = (at - row) + (at[0] <= t[i]);
        }
        for (int64_t i = 0; i < n; i++) {
            if (i + AHEAD < n) __builtin_prefetch(cum + (k0 + i + AHEAD) * (R + 1) + count[i + AHEAD]);
            total += cum[(k0 + i) * (R + 1) + count[i]];
        }
    }
    return total;
}
""".replace("FENCE", str(FENCE))

_FLAGS = ["-O2", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math"]
_state: dict[str, Optional[ctypes.CDLL]] = {}


def _cache_dir() -> Path:
    root = os.environ.get("MERGE_CORE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "merge_core")
    return Path(root)


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build() -> Optional[ctypes.CDLL]:
    digest = hashlib.sha256((_SOURCE + " ".join(_FLAGS)).encode()).hexdigest()[:16]
    target = _cache_dir() / f"native-{digest}.so"
    if not target.exists():
        cc = _compiler()
        if cc is None:
            raise RuntimeError("no C compiler found (set CC)")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, lib = Path(tmp) / "native.c", Path(tmp) / "native.so"
            src.write_text(_SOURCE)
            done = subprocess.run([cc, *_FLAGS, str(src), "-o", str(lib), "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
            os.replace(lib, target)  # atomic: concurrent workers may build at the same time
    lib = ctypes.CDLL(str(target))
    lib.della_kept.restype = ctypes.c_double
    lib.della_kept.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_float] * 2
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The compiled helpers; None when disabled (``MERGE_CORE_NATIVE=0``) or not buildable."""
    if os.environ.get("MERGE_CORE_NATIVE", "1") == "0":
        return None
    if "lib" not in _state:
        try:
            _state["lib"] = _build()
        except Exception as exc:  # no compiler, read-only cache, odd platform: PyTorch path
            log.warning("native merge helpers unavailable (%s); using PyTorch ops", exc)
            _state["lib"] = None
    return _state["lib"]


def della_kept(draws: torch.Tensor, fences: torch.Tensor, cum: torch.Tensor, positions: torch.Tensor,
               a: float, b: float) -> Optional[float]:
    """:meth:`~merge_core.kernels.della.DellaLookup.kept` in C; None when unavailable."""
    lib = library()
    if lib is None:
        return None
    groups, size = draws.shape
    return lib.della_kept(draws.data_ptr(), fences.data_ptr(), cum.data_ptr(), positions.data_ptr(),
                          groups, size, fences.shape[1], a, b)
