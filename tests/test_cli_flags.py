"""``merge-evolve``'s command line as a new user meets it: flags checked at once, help on every
flag, mergekit-evolve's no-effect flags marked as such."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import evolve.flag_checks
from evolve.cli import VERBS, build_parser
from evolve.cli import main as merge_evolve

HEAVY = ("torch", "ray", "lm_eval", "wandb", "transformers")


def _run_probe(argv: list[str]) -> tuple[str, str]:
    """main(argv) in a fresh interpreter: (its stderr, the heavy modules it imported)."""
    code = ("import sys, evolve.cli as c; rc = c.main(sys.argv[1:]); "
            f"print(rc, sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    return proc.stderr.strip(), proc.stdout.strip()


@pytest.mark.skipif(evolve.flag_checks.vllm_available(), reason="vLLM is installed here")
def test_vllm_without_vllm_is_refused_before_any_heavy_import(tmp_path: Path) -> None:
    err, out = _run_probe(["configs/toy.yml", "--storage-path", str(tmp_path / "run"), "--vllm"])
    assert err == f"merge-evolve: error: --vllm: {evolve.flag_checks.VLLM_MISSING}"
    assert out == "2 []"  # exit 2, and neither torch nor ray nor lm-eval was loaded
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--eval-dtype", "bogus"], "--eval-dtype: unknown dtype 'bogus'"),
    (["--device", "tpu"], "--device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (["--device", "cpu:1"], "--device: expected cpu, cuda or cuda:N"),
])
def test_bad_device_or_dtype_is_refused_before_any_heavy_import(flags, message, tmp_path: Path) -> None:
    err, out = _run_probe(["configs/toy.yml", "--storage-path", str(tmp_path / "run"), *flags])
    assert err.startswith(f"merge-evolve: error: {message}") and len(err.splitlines()) == 1
    assert out == "2 []"


@pytest.mark.skipif(not metadata.version("torch").endswith("+cpu"), reason="a CPU build of torch answers unimported")
def test_cuda_flags_on_a_cpu_build_of_torch_answer_without_importing_it(tmp_path: Path) -> None:
    for flags in (["--device", "cuda"], ["--merge-cuda"]):
        err, out = _run_probe(["configs/toy.yml", "--storage-path", str(tmp_path / "run"), *flags])
        assert "no CUDA device is available here" in err and out == "2 []", (flags, err, out)


def test_merge_cuda_needs_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(evolve.flag_checks, "_cuda_available", lambda: False)
    argv = ["configs/toy.yml", "--storage-path", str(tmp_path / "run"), "--merge-cuda"]
    assert merge_evolve(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("merge-evolve: error: --merge-cuda: no CUDA device") and len(err.splitlines()) == 1
    # With --device cpu there is no GPU to merge on, whatever the machine has: no torch needed.
    err, out = _run_probe([*argv, "--device", "cpu"])
    assert err.startswith("merge-evolve: error: --merge-cuda: the evaluation runs on --device cpu")
    assert out == "2 []"
    assert not (tmp_path / "run").exists()


def test_merge_cuda_default_and_no_merge_cuda_pass() -> None:
    parse = build_parser("run").parse_args
    for flags, value in (([], None), (["--no-merge-cuda"], False)):
        args = parse(["c.yml", "--storage-path", "r", *flags])
        assert args.merge_cuda is value
        evolve.flag_checks.check_flags(args)  # no error, no CUDA asked


def test_every_flag_has_help_and_compat_flags_are_marked() -> None:
    for verb in VERBS:
        parser = build_parser(verb)
        for action in parser._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"{verb}: {action.option_strings} has no help"
    run = build_parser("run")
    groups = {a.dest: g.title for g in run._action_groups for a in g._group_actions}
    for dest in evolve.flag_checks.COMPAT_FLAGS:
        assert "compatibility" in groups[dest] and "no effect" in groups[dest], dest
    text = run.format_help()
    assert text.index("resume --storage-path") < text.index("--max-fevals")  # the verbs come first
    assert "search.strategy" in text  # --strategy says it is not the config's search strategy


def test_compat_flag_given_gets_a_one_line_note(tmp_path: Path, capsys) -> None:
    argv = [str(tmp_path / "missing.yml"), "--storage-path", str(tmp_path / "run"), "--strategy", "serial",
            "--in-memory"]
    assert merge_evolve(argv) == 2  # the config is missing
    err = capsys.readouterr().err.strip().splitlines()
    notes = [line for line in err if line.startswith("merge-evolve: note: ")]
    assert len(notes) == 2 and "--strategy" in notes[0] and "no effect" in notes[0] and "--in-memory" in notes[1]
    assert err[-1].startswith("merge-evolve: error: ")
    # Not given: no note.
    assert merge_evolve([str(tmp_path / "missing.yml"), "--storage-path", str(tmp_path / "run")]) == 2
    assert "note:" not in capsys.readouterr().err
