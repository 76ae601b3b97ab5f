"""``merge-evolve``: search merge recipes with CMA-ES (a drop-in for mergekit-evolve).

    merge-evolve CONFIG --storage-path DIR [options]      run (or continue) a search
    merge-evolve run CONFIG --storage-path DIR [options]  the same, spelled out
    merge-evolve resume --storage-path DIR [options]      continue with the stored config
    merge-evolve report --storage-path DIR [--json] [--html [PATH]]  summarise a run directory

mergekit-evolve's options keep their meaning and defaults.  Heavy modules (ray, lm_eval, wandb,
torch) are imported only once a command runs, so ``--help`` is instant.  The command line is
turned into a typed :class:`~evolve.options.RunOptions` here, once; nothing below sees argparse.
"""

from __future__ import annotations

import argparse
import errno
import math
import sys
from collections.abc import Callable
from pathlib import Path

from evolve.options import DEFAULT_MAX_FEVALS, DEFAULT_SIGMA0, RunOptions

EXIT_BAD_INPUT = 2
# The file system refused a write (full, read-only, quota, permissions): the user can fix that.
WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG})
VERBS = ("run", "resume", "report")
USAGE = """merge-evolve [run] CONFIG --storage-path DIR [options]   run (or continue) a search
       merge-evolve resume --storage-path DIR [options]       continue with the stored config
       merge-evolve report --storage-path DIR [--json] [--html [PATH]]
       (`merge-evolve VERB --help` for each verb's options)"""


def _number(kind: type, minimum: float, what: str) -> Callable[[str], int | float]:
    """An argparse type: ``kind`` (int or float), finite, at least ``minimum`` (``what`` says so)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (kind is float and minimum == 0 and value == 0):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


POSITIVE_INT = _number(int, 1, "an integer >= 1")
SEED = _number(int, 0, "an integer >= 0")
POPSIZE = _number(int, 2, "an integer >= 2")
POSITIVE = _number(float, 0, "a number > 0")


def _folder(text: str) -> Path:
    """An argparse type: an existing directory."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such directory '{text}'")
    return path


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    mk = parser.add_argument_group("mergekit-evolve options (same meaning and defaults)")
    mk.add_argument("--max-fevals", type=POSITIVE_INT, default=DEFAULT_MAX_FEVALS,
                    help=f"evaluation budget (default {DEFAULT_MAX_FEVALS})")
    mk.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=False,
                    help="score candidates with vLLM instead of Hugging Face transformers")
    mk.add_argument("--num-gpus", type=POSITIVE_INT, default=None, help="GPUs to use (one worker per GPU)")
    mk.add_argument("--merge-cuda", action=argparse.BooleanOptionalAction, default=None,
                    help="merge on the GPU (default: on when the evaluation runs on a GPU); given on a "
                         "machine without CUDA: an error")
    mk.add_argument("--batch-size", type=POSITIVE_INT, default=None, help="lm-eval batch size")
    mk.add_argument("--sigma0", type=POSITIVE, default=DEFAULT_SIGMA0, help="initial CMA-ES step (default 1/6)")
    mk.add_argument("--random-seed", type=SEED, default=None,
                    help="seed of the whole run (default 0, or the stored run's seed when resuming)")
    mk.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=False,
                    help="log to Weights & Biases (WANDB_MODE=offline works without a key)")
    mk.add_argument("--wandb-project", default=None, metavar="NAME",
                    help="W&B project of the run (default: W&B's, from WANDB_PROJECT or its default)")
    mk.add_argument("--wandb-entity", default=None, metavar="NAME",
                    help="W&B entity (user or team) of the run (default: W&B's)")
    mk.add_argument("--task-search-path", action="append", default=[], type=_folder,
                    help="folder of lm-eval task YAMLs (repeatable; eval_tasks/ is always searched)")
    mk.add_argument("--save-final-model", action=argparse.BooleanOptionalAction, default=True,
                    help="merge the best recipe into STORAGE/final_model at the end (default on)")
    mk.add_argument("--timeout", type=POSITIVE, default=None,
                    help="stop asking new generations after this many seconds of this session")
    mk.add_argument("--force-population-size", type=POPSIZE, default=None,
                    help="CMA-ES population size (>= 2)")
    mk.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False,
                    help="let transformers run code shipped with a model (its own architecture); off by default")
    mk.add_argument("--allow-crimes", action=argparse.BooleanOptionalAction, default=False,
                    help="allow merging models of different architectures (mergekit's escape hatch)")
    mk.add_argument("--load-in-8bit", action="store_true", help="not supported (an error)")
    mk.add_argument("--load-in-4bit", action="store_true", help="not supported (an error)")

    ours = parser.add_argument_group("merge-evolve options")
    when = ours.add_mutually_exclusive_group()
    when.add_argument("--async", dest="schedule", action="store_const", const="async", default=None,
                      help="steady state: a freed worker gets a new candidate at once (the default for new runs)")
    when.add_argument("--sync", dest="schedule", action="store_const", const="sync",
                      help="generation barrier: the trajectory does not depend on timing (mergekit-evolve's)")
    ours.add_argument("--racing", action=argparse.BooleanOptionalAction, default=None,
                      help="score candidates on growing subsets of the documents and stop those that cannot "
                           "reach the level set by search.racing_level (default: the config's search.racing, on)")
    ours.add_argument("--num-workers", type=POSITIVE_INT, default=None,
                      help="evaluation workers (default: one per GPU, else 2 on CPU)")
    ours.add_argument("--ray-address", default=None,
                      help="join this Ray cluster (e.g. auto, ray://host:10001; local: a private Ray); default: "
                           "RAY_ADDRESS, else the cluster `ray start` runs on this machine, else a private one")
    ours.add_argument("--no-ray", action="store_true",
                      help="evaluate in this process with one worker (debugging)")
    ours.add_argument("--device", default=None, help="evaluation device: cpu or cuda (default: auto)")
    ours.add_argument("--eval-dtype", default=None,
                      help="evaluation dtype (default float32 on CPU, bfloat16 on GPUs)")
    ours.add_argument("--no-shared-context", dest="shared_context", action="store_false",
                      help="HF backend: score each choice as its own sequence, as lm-eval does "
                           "(default: the choices of a document share one forward pass of its context)")
    ours.add_argument("--eval-timeout", type=POSITIVE, default=None,
                      help="seconds one candidate may take before its worker is restarted")
    ours.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    ours.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                      help="score each input model and the equal-weights merge once at the start, so the "
                           "report shows the best's gain over its parents (default on; stored ones are reused)")

    # No effect here: kept so that mergekit-evolve command lines run unchanged (a note when given).
    compat = parser.add_argument_group("mergekit-evolve compatibility (accepted, no effect; a note when given)")
    compat.add_argument("--strategy", choices=("pool", "buffered", "serial"), default=None,
                        help="mergekit-evolve's evaluation scheduling; here the workers are always kept fed. "
                             "Not the search algorithm: that is the config's search.strategy")
    compat.add_argument("--in-memory", action=argparse.BooleanOptionalAction, default=None,
                        help="merges always happen in memory")
    compat.add_argument("--reshard", action=argparse.BooleanOptionalAction, default=None,
                        help="the final model is always written sharded")
    compat.add_argument("--i-understand-the-depths-of-the-evils-i-am-unleashing", action="store_true",
                        default=None, help="nothing here needs it")


def build_parser(verb: str) -> argparse.ArgumentParser:
    """The parser of one verb (``run`` is also the default when no verb is given)."""
    parser = argparse.ArgumentParser(
        prog=f"merge-evolve {verb}" if verb != "run" else "merge-evolve",
        usage=USAGE if verb == "run" else None,
        description=(__doc__ or "").split("\n\n")[0].replace("``", ""),
        epilog="verbs: run (default), resume, report; see `merge-evolve VERB --help`",
        allow_abbrev=False,  # a typo such as --max-feval must be an error, not a guess
    )
    if verb == "run":
        parser.add_argument("config", type=Path, help="evolve config (mergekit-evolve YAML)")
    parser.add_argument("--storage-path", type=Path, required=True, help="run directory")
    if verb == "report":
        parser.add_argument("--json", action="store_true", help="print the summary as JSON")
        parser.add_argument("--html", nargs="?", const="", default=None, metavar="PATH",
                            help="also write the run's HTML report (one self-contained file; default "
                                 "DIR/report.html, the only file report writes)")
    else:
        _add_run_options(parser)
    return parser


def run_options(args: argparse.Namespace) -> RunOptions:
    """The typed options of a parsed ``run``/``resume`` command line."""
    return RunOptions(
        storage_path=args.storage_path,
        config=getattr(args, "config", None),
        max_fevals=args.max_fevals,
        vllm=args.vllm,
        num_gpus=args.num_gpus,
        merge_cuda=args.merge_cuda is not False,  # None: the default, on
        batch_size=args.batch_size,
        sigma0=args.sigma0,
        random_seed=args.random_seed,
        wandb=args.wandb,
        wandb_project=args.wandb_project,
        wandb_entity=args.wandb_entity,
        task_search_paths=tuple(args.task_search_path),
        save_final_model=args.save_final_model,
        timeout=args.timeout,
        force_population_size=args.force_population_size,
        trust_remote_code=args.trust_remote_code,
        allow_crimes=args.allow_crimes,
        num_workers=args.num_workers,
        ray_address=args.ray_address,
        no_ray=args.no_ray,
        device=args.device,
        eval_dtype=args.eval_dtype,
        shared_context=args.shared_context,
        eval_timeout=args.eval_timeout,
        quiet=args.quiet,
        schedule=args.schedule,
        baselines=args.baselines,
        racing=args.racing,
    )


def main(argv: list[str] | None = None) -> int:
    """Console entry point; bad input prints one line and exits 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = argv.pop(0) if argv and argv[0] in VERBS else "run"
    args = build_parser(verb).parse_args(argv)
    from merge_core.errors import MergeError

    try:
        if verb == "report":
            from evolve.report import report

            return report(args.storage_path, as_json=args.json, html=args.html)
        from evolve.flag_checks import check_flags, compat_notes

        check_flags(args)  # before the heavy imports: a flag that cannot work answers at once
        compat_notes(args)
        from evolve.app import run_search
        from evolve.signals import stop_on_signals

        with stop_on_signals():
            return run_search(run_options(args), resume=(verb == "resume"))
    except MergeError as err:
        print(f"merge-evolve: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # stdout's reader went away (`merge-evolve report ... | head`)
        from merge_core.fsutil import drop_closed_stdout

        if verb != "report":
            print("merge-evolve: standard output was closed (broken pipe); what was recorded is intact: run the "
                  "same command again to resume", file=sys.stderr)
        return drop_closed_stdout()
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        where = f"'{err.filename}'" if err.filename else "to the run directory"
        print(f"merge-evolve: error: cannot write {where}: {err.strerror}; what was recorded so far is "
              "intact: fix that, then run the same command again to resume", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP (evolve.signals)
        from evolve.signals import exit_status, signal_name

        status = exit_status(exc)
        why = "interrupted" if status == 130 else f"stopped by {signal_name(status)}"
        print(f"merge-evolve: {why}; what was recorded is intact: run the same command again to resume",
              file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
