"""``merge-evolve``: search merge recipes with CMA-ES (a drop-in for mergekit-evolve).

    merge-evolve CONFIG --storage-path DIR [options]      run (or continue) a search
    merge-evolve run CONFIG --storage-path DIR [options]  the same, spelled out
    merge-evolve resume --storage-path DIR [options]      continue with the stored config
    merge-evolve report --storage-path DIR [--json]       summarise a run directory

mergekit-evolve's options keep their meaning and defaults.  Heavy modules (ray, lm_eval, wandb,
torch) are imported only once a command runs, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
VERBS = ("run", "resume", "report")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    mk = parser.add_argument_group("mergekit-evolve options (same meaning and defaults)")
    mk.add_argument("--max-fevals", type=int, default=100, help="evaluation budget (default 100)")
    mk.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=False,
                    help="score candidates with vLLM instead of Hugging Face transformers")
    mk.add_argument("--in-memory", action=argparse.BooleanOptionalAction, default=True,
                    help="accepted for compatibility: merges always happen in memory")
    mk.add_argument("--strategy", choices=("pool", "buffered", "serial"), default="pool",
                    help="accepted for compatibility: workers are always kept fed")
    mk.add_argument("--num-gpus", type=int, default=None, help="GPUs to use (one worker per GPU)")
    mk.add_argument("--merge-cuda", action=argparse.BooleanOptionalAction, default=True,
                    help="merge on the GPU when one is present (default on)")
    mk.add_argument("--batch-size", type=int, default=None, help="lm-eval batch size")
    mk.add_argument("--sigma0", type=float, default=1 / 6, help="initial CMA-ES step (default 1/6)")
    mk.add_argument("--random-seed", type=int, default=None,
                    help="seed of the whole run (default 0, or the stored run's seed when resuming)")
    mk.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=False,
                    help="log to Weights & Biases (WANDB_MODE=offline works without a key)")
    mk.add_argument("--wandb-project", default=None)
    mk.add_argument("--wandb-entity", default=None)
    mk.add_argument("--task-search-path", action="append", default=[], type=Path,
                    help="folder of lm-eval task YAMLs (repeatable; eval_tasks/ is always searched)")
    mk.add_argument("--save-final-model", action=argparse.BooleanOptionalAction, default=True,
                    help="merge the best recipe into STORAGE/final_model at the end (default on)")
    mk.add_argument("--timeout", type=float, default=None,
                    help="stop asking new generations after this many seconds of this session")
    mk.add_argument("--force-population-size", type=int, default=None, help="CMA-ES population size")
    mk.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False)
    mk.add_argument("--allow-crimes", action=argparse.BooleanOptionalAction, default=False)
    mk.add_argument("--reshard", action=argparse.BooleanOptionalAction, default=True,
                    help=argparse.SUPPRESS)
    mk.add_argument("--i-understand-the-depths-of-the-evils-i-am-unleashing", action="store_true",
                    help=argparse.SUPPRESS)
    mk.add_argument("--load-in-8bit", action="store_true", help=argparse.SUPPRESS)
    mk.add_argument("--load-in-4bit", action="store_true", help=argparse.SUPPRESS)

    ours = parser.add_argument_group("merge-evolve options")
    ours.add_argument("--num-workers", type=int, default=None,
                      help="evaluation workers (default: one per GPU, else 2 on CPU)")
    ours.add_argument("--ray-address", default=None,
                      help="join this Ray cluster (e.g. auto, ray://host:10001); default: a local one")
    ours.add_argument("--no-ray", action="store_true",
                      help="evaluate in this process with one worker (debugging)")
    ours.add_argument("--device", default=None, help="evaluation device: cpu or cuda (default: auto)")
    ours.add_argument("--eval-dtype", default=None,
                      help="evaluation dtype (default float32 on CPU, bfloat16 on GPUs)")
    ours.add_argument("--no-shared-context", dest="shared_context", action="store_false",
                      help="HF backend: score each choice as its own sequence, as lm-eval does "
                           "(default: the choices of a document share one forward pass of its context)")
    ours.add_argument("--eval-timeout", type=float, default=None,
                      help="seconds one candidate may take before its worker is restarted")
    ours.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def build_parser(verb: str) -> argparse.ArgumentParser:
    """The parser of one verb (``run`` is also the default when no verb is given)."""
    parser = argparse.ArgumentParser(
        prog=f"merge-evolve {verb}" if verb != "run" else "merge-evolve",
        description=__doc__.split("\n\n")[0],
        epilog="verbs: run (default), resume, report; see `merge-evolve VERB --help`",
    )
    if verb == "run":
        parser.add_argument("config", type=Path, help="evolve config (mergekit-evolve YAML)")
    parser.add_argument("--storage-path", type=Path, required=True, help="run directory")
    if verb == "report":
        parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    else:
        _add_run_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point; bad input prints one line and exits 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = argv.pop(0) if argv and argv[0] in VERBS else "run"
    args = build_parser(verb).parse_args(argv)
    from merge_core.errors import MergeError

    try:
        if verb == "report":
            from evolve.report import report

            return report(args.storage_path, as_json=args.json)
        from evolve.run import run_search

        return run_search(args, resume=(verb == "resume"))
    except MergeError as err:
        print(f"merge-evolve: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("merge-evolve: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
