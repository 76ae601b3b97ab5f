"""``merge-yaml RECIPE OUT_DIR``: merge models as a mergekit YAML recipe says.

Accepts mergekit-yaml's common flags so users' command lines keep working; flags that only
tune mergekit's own memory strategy (``--low-cpu-memory``, ``--lazy-unpickle``, ``--gpu-rich``)
are accepted and have nothing to do here, because this engine always streams tensor by tensor.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="merge-yaml", description="Merge models as described by a mergekit-style YAML recipe."
    )
    parser.add_argument("config", type=Path, help="the recipe (mergekit YAML)")
    parser.add_argument("out_path", type=Path, help="directory to write the merged model to")
    parser.add_argument("--device", default=None, help="device for the math: cpu (default) or cuda[:n]")
    parser.add_argument("--cuda", action="store_true", help="same as --device cuda")
    parser.add_argument("--out-shard-size", default="5B", help="max size of one output shard (e.g. 1B, 500M)")
    parser.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                        help="copy the tokenizer of the base model (or tokenizer_source)")
    parser.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True,
                        help="write a README.md model card")
    parser.add_argument("--random-seed", type=int, default=None,
                        help="seed for randomized methods (DARE, DELLA); fixed at 0 when omitted")
    parser.add_argument("--allow-crimes", action="store_true",
                        help="allow merging models of different architectures")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="accept models whose config asks for remote code")
    parser.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=False,
                        help="flush the output to disk before moving it into place, so that not even a "
                             "power cut can leave a complete-looking directory with missing data (an "
                             "interrupted merge never does either way); costs waiting for the disk")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    # Accepted for mergekit-yaml compatibility: they tune mergekit's memory strategy, and this
    # engine always streams tensor by tensor with lazily opened safetensors.
    for flag in ("--low-cpu-memory", "--lazy-unpickle", "--gpu-rich", "--clone-tensors",
                 "--lazy-loader", "--safe-serialization", "--verbose", "-v"):
        parser.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lora-merge-dtype", default=None, metavar="DTYPE",
                        help="dtype of the tensors a 'base+adapter' input's adapter changes (computed in "
                             "float32; default: the base tensor's dtype)")
    parser.add_argument("--transformers-cache", default=None, help=argparse.SUPPRESS)
    # mergekit writes base+adapter merges to this cache; here adapters are merged when read.
    parser.add_argument("--lora-merge-cache", default=None, help=argparse.SUPPRESS)
    return parser


def set_compute_threads(device: str) -> None:
    """Leave one core to the reader and writer threads: torch math gets the others.

    The merge math runs on ~128K-element chunks; an OpenMP team spanning every core stalls at
    each chunk whenever one of its cores is busy with I/O (or another process), which made
    whole merges many times slower on a 2-core machine.  ``OMP_NUM_THREADS`` overrides this.
    """
    if not device.startswith("cpu") or os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    torch.set_num_threads(max(1, cpus - 1))


def run(args: argparse.Namespace) -> Path:
    """Load, validate, plan and execute; raises MergeError on bad input."""
    import gc

    # Importing torch creates a few hundred thousand objects, and the cyclic collector would
    # traverse them again and again (0.2-0.4 s of a 3 s merge here): collect nothing while
    # importing, then freeze what was imported so later collections skip it.
    gc.disable()
    try:
        from merge_core.errors import RecipeError
        from merge_core.executor import MergeOptions, run_merge
        from merge_core.fsutil import refuse_overwrite
        from merge_core.planner import plan_merge, torch_dtype
        from merge_core.recipe import load_recipe
        from merge_core.writer import parse_size
    finally:
        gc.freeze()
        gc.enable()

    device = "cuda" if args.cuda else (args.device or "cpu")
    try:
        shard_size = parse_size(args.out_shard_size)
    except ValueError as err:
        raise RecipeError("--out-shard-size", str(err)) from None
    try:
        lora_merge_dtype = torch_dtype(args.lora_merge_dtype, aliases=True)
    except KeyError:
        raise RecipeError("--lora-merge-dtype", f"unknown dtype {args.lora_merge_dtype!r}") from None
    recipe = load_recipe(args.config)
    # The output folder is replaced whole: never where the recipe lies (the models: run_merge).
    refuse_overwrite(args.out_path, [("the recipe", args.config)], "OUT_DIR")
    plan = plan_merge(
        recipe,
        seed=args.random_seed,
        relative_to=args.config.parent,
        allow_crimes=args.allow_crimes,
        trust_remote_code=args.trust_remote_code,
        lora_merge_dtype=lora_merge_dtype,
    )
    options = MergeOptions(
        device=device,
        out_shard_size=shard_size,
        copy_tokenizer=args.copy_tokenizer,
        write_model_card=args.write_model_card,
        show_progress=not args.quiet and sys.stderr.isatty(),
        fsync=args.fsync,
    )
    set_compute_threads(device)
    return run_merge(plan, args.out_path, recipe.to_yaml(), options)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; bad input prints one line and exits 2, writing nothing.

    Called without ``argv`` (the ``merge-yaml`` script, ``python -m merge_core.cli``) the
    process ends as soon as the result is reported: by then the output is written (fsynced
    with ``--fsync``) and renamed into place and every file is closed, and the interpreter's own teardown
    with torch loaded (freeing thousands of modules' objects) would add 0.3-0.8 s to every
    merge.  Called with ``argv`` (tests, other Python code) it simply returns the exit code.
    """
    args = build_parser().parse_args(argv)
    from merge_core.errors import MergeError, MethodError

    try:
        out = run(args)
    except (MergeError, MethodError) as err:
        print(f"merge-yaml: error: {err}", file=sys.stderr)
        return _finish(EXIT_BAD_INPUT, argv is None)
    if not args.quiet:
        try:
            print(f"merged model written to {out}", flush=True)
        except BrokenPipeError:  # the model is written; only the line had no reader
            from merge_core.fsutil import drop_closed_stdout

            drop_closed_stdout()
    return _finish(0, argv is None)


def _finish(code: int, exit_now: bool) -> int:
    if exit_now:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
