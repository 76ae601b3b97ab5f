"""Command-line checks that answer in a second: run before any heavy import (torch, ray, lm-eval).

A flag that cannot work here (``--vllm`` without vLLM, ``--merge-cuda`` without a GPU) is
refused before the run loads its stack, which takes tens of seconds on a busy machine.  Flags
kept only for mergekit-evolve's command line get a one-line note when given.  Nothing here
imports torch unless a flag asks for CUDA.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any, TextIO

from merge_core.errors import RecipeError

__all__ = ["COMPAT_FLAGS", "VLLM_MISSING", "check_device_and_dtype", "check_flags", "compat_notes", "vllm_available"]

VLLM_MISSING = ("vLLM is not installed in this environment; install the [vllm] extra (GPU) "
                "or run scripts/setup_vllm.sh (CPU build)")

# Accepted for mergekit-evolve's command line, no effect here: destination -> (flag, why).
COMPAT_FLAGS: dict[str, tuple[str, str]] = {
    "strategy": ("--strategy", "the workers are always kept fed; the search's optimizer is the config's "
                               "search.strategy"),
    "in_memory": ("--in-memory", "merges always happen in memory"),
    "reshard": ("--reshard", "the final model is written sharded by the merge engine"),
    "i_understand_the_depths_of_the_evils_i_am_unleashing": (
        "--i-understand-the-depths-of-the-evils-i-am-unleashing", "nothing here needs it"),
}


def vllm_available() -> bool:
    """Whether a ``vllm`` package is installed (a spec lookup: imports nothing)."""
    return importlib.util.find_spec("vllm") is not None


def _cuda_available() -> bool:
    """Whether torch sees a CUDA device; a CPU build of torch (``2.13.0+cpu``) answers without
    being imported (seconds on a busy machine)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        if version("torch").endswith("+cpu"):
            return False
    except PackageNotFoundError:
        return False
    import torch  # only when a flag asks for CUDA

    return bool(torch.cuda.is_available())


def check_device_and_dtype(device: str | None, eval_dtype: str | None) -> None:
    """``--device`` is cpu, cuda or cuda:N and there (torch is imported only for cuda);
    ``--eval-dtype`` is a dtype name."""
    from merge_core.dtypes import DTYPE_ALIASES, RECIPE_DTYPES, canonical_name

    if device is not None:
        kind, _, index = device.partition(":")
        if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
            raise RecipeError("--device", f"expected cpu, cuda or cuda:N, got {device!r}")
        if kind == "cuda":
            if not _cuda_available():
                raise RecipeError("--device", f"{device}: no CUDA device is available here")
            import torch

            if index and int(index) >= torch.cuda.device_count():
                raise RecipeError("--device", f"{device}: this machine has {torch.cuda.device_count()} CUDA devices")
    if eval_dtype is not None and eval_dtype != "auto":
        try:
            canonical_name(eval_dtype, aliases=True)
        except KeyError:
            known = ", ".join([*RECIPE_DTYPES, *DTYPE_ALIASES, "auto"])
            raise RecipeError("--eval-dtype", f"unknown dtype {eval_dtype!r}; use one of {known}") from None


def check_flags(args: Any) -> None:
    """Refuse flags this machine cannot honour (:class:`RecipeError` naming the flag)."""
    if getattr(args, "load_in_8bit", False) or getattr(args, "load_in_4bit", False):
        raise RecipeError("--load-in-8bit/--load-in-4bit", "quantized evaluation is not supported")
    if getattr(args, "vllm", False) and not vllm_available():
        raise RecipeError("--vllm", VLLM_MISSING)
    check_device_and_dtype(getattr(args, "device", None), getattr(args, "eval_dtype", None))
    if getattr(args, "merge_cuda", None) is True:  # given on the command line (default: None)
        device = getattr(args, "device", None)
        if device is not None and not device.startswith("cuda"):
            raise RecipeError("--merge-cuda", f"the evaluation runs on --device {device}: there is no GPU to merge "
                                              "on (drop --merge-cuda)")
        if not _cuda_available():
            raise RecipeError("--merge-cuda", "no CUDA device is available here; drop it (or use --no-merge-cuda) "
                                              "to merge on the CPU")


def compat_notes(args: Any, out: TextIO | None = None) -> None:
    """One line per mergekit-evolve flag given that has no effect here."""
    for dest, (flag, why) in COMPAT_FLAGS.items():
        if getattr(args, dest, None) is not None:  # given (their defaults are None)
            print(f"merge-evolve: note: {flag} is accepted for mergekit-evolve compatibility and has no effect "
                  f"({why})", file=out or sys.stderr)
