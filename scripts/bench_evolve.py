#!/usr/bin/env python
"""Throughput of merge-evolve on the toy zoo, measured in one run, printed as ratios.

    python scripts/bench_evolve.py [--max-fevals 100] [--workers 2] [--repeats 3]
                                   [--mergekit-python .venv-mergekit/bin/python] [--vllm]
                                   [--inputs | --inputs-only] [--inputs-fevals 40]

1. plain lm-eval: ``simple_evaluate`` on one already-merged model (the equal-weights merge of the
   zoo's experts, written once with merge-yaml), HF backend, model loaded once, same tasks, batch
   size and torch threads as one merge-evolve worker; median of ``--repeats`` runs.
2. merge-evolve with 1 worker: steady-state wall seconds per evaluation (merge in memory +
   evaluate + driver round trip, between consecutive results) -> overhead vs (1). Target <= 1.10.
   Measured twice: with ``--no-shared-context`` (lm-eval's own per-request scoring: the harness
   overhead alone) and with the default shared-context scoring (choices of a document share
   one forward pass; same scores); the same seed must reach the same best in both.
3. merge-evolve with ``--workers`` workers (Ray): evaluations/hour (steady state, and including
   start-up), worker busy fraction (target >= 0.95).  Runs 1-3 score every candidate on every
   document and skip the baselines (``--no-racing --no-baselines``: equal fidelity with earlier
   versions); a last run with the defaults (racing, baselines) prints candidates/hour and the
   documents it scored.
4. mergekit-evolve on the same config and budget, when ``--mergekit-python`` names a Python with
   mergekit[evolve] that can run it here; otherwise the reason it could not run is printed.
   Target: ours >= 3x its evaluations/hour.
5. with ``--vllm`` (needs ``.venv-vllm``, see scripts/setup_vllm.sh): the vLLM evaluator's
   evaluations/minute vs the HF evaluator's on the same config.
6. with ``--inputs``: the toy config three ways, 1 worker, every document, no baselines
   (``--inputs-fevals`` candidates each): as it is; with ``format`` replaced by a copy with two
   added chat tokens and ``tokenizer_source: union`` (every candidate in the merged vocabulary);
   with ``arith`` replaced by ``base+adapter`` (a rank-16 LoRA adapter).  Prints each run's
   steady seconds per evaluation and its workers' median merge seconds per candidate, and the
   ratios to the first (the permutation and the adapter are applied once per worker: ~1.0).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "toy.yml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
       "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def ensure_zoo(zoo: Path) -> None:
    """Build the default zoo at ``zoo`` unless an up-to-date one is there (cached by its stamp)."""
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_zoo.py"), "--out", str(zoo)],
                   check=True, env=ENV, stdout=subprocess.DEVNULL)


def run_evolve(workdir: Path, name: str, extra: list[str], python: str = sys.executable, config: Path = TOY) -> dict:
    """One merge-evolve run of ``config`` (the toy config) in ``workdir``; wall time, ledger, stdout."""
    storage = workdir / "runs" / name
    shutil.rmtree(storage, ignore_errors=True)
    cmd = [python, "-m", "evolve.cli", str(config), "--storage-path", str(storage), "-q", "--random-seed", "0",
           "--no-save-final-model", "--ray-address", "local", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"merge-evolve {name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    ledger = [json.loads(x) for x in (storage / "evaluations.jsonl").read_text().splitlines()]
    train = [r for r in ledger if r["kind"] == "train" and r.get("cached_from") is None]
    ends = sorted(r["timings"]["done_unix"] for r in train)
    busy = re.search(r"worker busy fraction ([0-9.]+)", proc.stdout)
    best = max(r["fitness"] for r in train)
    docs = [r.get("documents") for r in train]
    full = [r.get("documents_full") for r in train]
    documents = sum(docs) / sum(full) if all(docs) and all(full) else 1.0
    return {"wall": wall, "n": len(train), "steady_per_eval": (ends[-1] - ends[0]) / (len(ends) - 1),
            "documents": documents, "merge_s": statistics.median(r["timings"]["merge"] for r in train),
            "busy": float(busy.group(1)) if busy else float("nan"), "best": best,
            "run_s": statistics.median(r["timings"]["run"] for r in train)}


def plain_lm_eval(model_dir: Path, threads: int, batch_size: int, repeats: int) -> float:
    """Median wall seconds of lm_eval.simple_evaluate on an already-loaded merged model."""
    import torch
    import yaml
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    tasks = [t["name"] for t in yaml.safe_load(TOY.read_text())["tasks"]]
    torch.set_num_threads(threads)
    lm = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=batch_size)
    manager = TaskManager(include_path=str(REPO / "eval_tasks"), include_defaults=False, verbosity="ERROR")
    times = []
    for _ in range(repeats + 1):  # the first run warms caches (tokenizer, dataset loading)
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's progress bars have no switch
            simple_evaluate(model=lm, tasks=tasks, task_manager=manager, bootstrap_iters=0, verbosity="ERROR")
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def merge_equal_weights(zoo: Path, out: Path) -> Path:
    """The equal-weights task-arithmetic merge of the zoo's experts, written like merge-yaml does."""
    recipe = out.parent / "equal.yml"
    recipe.write_text(
        "merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n".format(b=zoo / "base")
        + "".join(f"  - model: {zoo / e}\n    parameters: {{weight: 0.3333333}}\n" for e in ("spatial", "arith", "format"))
        + "dtype: float32\n")
    subprocess.run([sys.executable, "-m", "merge_core.cli", str(recipe), str(out), "-q"], check=True, env=ENV)
    return out


def mergekit_evolve(python: str | None, workdir: Path, fevals: int, workers: int, batch: int) -> tuple[float | None, str]:
    """(evaluations/hour, note) of mergekit-evolve 0.1.5 on the toy config, or (None, why not).

    Runs through scripts/mergekit_evolve_cpu.py (its runtime patches for CPU-only machines; deps:
    scripts/setup_mergekit_evolve.sh), on-disk mode (its default), ``workers`` Ray workers, the
    same lm-eval batch size as ours (its own default is 1).  It evaluates whole generations, so
    it may run a few more evaluations than ``fevals``: they are counted from its log.
    """
    if not python:
        return None, "not attempted (pass --mergekit-python .venv-mergekit/bin/python)"
    python = str(Path(python).absolute())  # the run's cwd is a temp dir
    probe = subprocess.run([python, "-c", "import mergekit.evo, lm_eval, ray, cma"], capture_output=True, text=True)
    if probe.returncode != 0:
        return None, (f"cannot run: {(probe.stderr.strip().splitlines() or ['?'])[-1]} "
                      "(bash scripts/setup_mergekit_evolve.sh installs its evolve deps)")
    cmd = [python, str(REPO / "scripts" / "mergekit_evolve_cpu.py"), str(TOY), "--storage-path",
           str(workdir / "runs" / "mk"), "--task-search-path", str(REPO / "eval_tasks"), "--max-fevals", str(fevals),
           "--no-wandb", "--random-seed", "0", "--batch-size", str(batch), "--num-gpus", str(workers)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env={**ENV, "RAY_DEDUP_LOGS": "0", "HF_HOME": str(workdir / "hf")},
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return None, f"cannot run: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"
    # lm-eval prints "fatal: not a git repository" once per simple_evaluate outside a checkout:
    # one line per evaluation (RAY_DEDUP_LOGS=0 keeps the workers' repeats apart).
    n = max(fevals, (proc.stdout + proc.stderr).count("not a git repository"))
    return 3600 * n / wall, f"{n} evaluations in {wall:.0f} s (whole command)"


def bench_inputs(work: Path, fevals: int, batch: int, say) -> None:
    """Section 6 of the module docstring."""
    import yaml

    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_inputs import CHAT_TOKENS, write_adapter

    from tiny_models import with_added_tokens

    variants = work / "variants"
    chat = with_added_tokens(work / "zoo" / "format", variants / "format_chat", CHAT_TOKENS, special=True)
    adapter = write_adapter(work / "zoo" / "base", variants / "arith_lora")
    toy = yaml.safe_load(TOY.read_text())
    configs = {"same vocabulary": toy,
               "merged vocabulary": {**toy, "genome": {**toy["genome"], "tokenizer_source": "union",
                                                       "models": ["zoo/spatial", "zoo/arith", str(chat)]}},
               "LoRA adapter": {**toy, "genome": {**toy["genome"],
                                                  "models": ["zoo/spatial", f"zoo/base+{adapter}", "zoo/format"]}}}
    common = ["--max-fevals", str(fevals), "--batch-size", str(batch), "--no-racing", "--no-baselines",
              "--num-workers", "1"]
    first = None
    for i, (label, data) in enumerate(configs.items()):
        path = work / f"inputs{i}.yml"
        path.write_text(yaml.safe_dump(data))
        run = run_evolve(work, f"inputs{i}", common, config=path)
        first = first or run
        say(f"inputs: {label:<18} {run['steady_per_eval']:.3f} s/evaluation steady "
            f"(x{run['steady_per_eval'] / first['steady_per_eval']:.2f}), merge {run['merge_s'] * 1000:.1f} ms "
            f"per candidate (x{run['merge_s'] / first['merge_s']:.2f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, default=REPO / "zoo")
    ap.add_argument("--max-fevals", type=int, default=100)  # the toy config's budget
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=None, help="lm-eval batch size (default: ours)")
    ap.add_argument("--mergekit-python", default=None)
    ap.add_argument("--vllm", action="store_true")
    ap.add_argument("--inputs", action="store_true", help="also: merged vocabularies and LoRA adapters (section 6)")
    ap.add_argument("--inputs-only", action="store_true", help="only section 6")
    ap.add_argument("--inputs-fevals", type=int, default=40)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    ensure_zoo(args.zoo)
    from evolve.evaluation import EvalSettings
    batch = args.batch_size or EvalSettings().batch_size
    say = lambda line: print(line, flush=True)  # noqa: E731  (each result as soon as it is measured)
    say(f"toy config {TOY.name}, budget {args.max_fevals}, lm-eval batch {batch}, {cores} cores")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "zoo").symlink_to(args.zoo.resolve(), target_is_directory=True)
        if args.inputs_only:
            bench_inputs(work, args.inputs_fevals, batch, say)
            return 0
        merged = merge_equal_weights(args.zoo.resolve(), work / "merged")
        plain = plain_lm_eval(merged, cores, batch, args.repeats)
        say(f"plain lm-eval, one merged model, {cores} threads: {plain:.3f} s/evaluation (median of {args.repeats})")
        # Equal fidelity: every candidate on every document, no baselines (as before racing and
        # baselines existed); racing's saving is measured apart, by the last run.
        common = ["--max-fevals", str(args.max_fevals), "--batch-size", str(batch), "--no-racing", "--no-baselines"]
        # lm-eval's own per-request scoring first: the harness overhead alone, like for like
        own = run_evolve(work, "one-unshared", [*common, "--num-workers", "1", "--no-shared-context"])
        say(f"merge-evolve --no-shared-context, 1 worker x {cores} threads: {own['steady_per_eval']:.3f} "
            f"s/evaluation steady (worker run median {own['run_s']:.3f} s) -> overhead ratio "
            f"{own['steady_per_eval'] / plain:.3f} (target <= 1.10)")
        one = run_evolve(work, "one", [*common, "--num-workers", "1"])
        say(f"merge-evolve (shared-context scoring, the default), 1 worker x {cores} threads: "
            f"{one['steady_per_eval']:.3f} s/evaluation steady (worker run median {one['run_s']:.3f} s) "
            f"-> ratio to plain lm-eval {one['steady_per_eval'] / plain:.3f}; same best "
            f"{'yes' if abs(one['best'] - own['best']) < 1e-4 else 'NO'} ({one['best']:.4f} vs {own['best']:.4f})")
        many = run_evolve(work, "many", [*common, "--num-workers", str(args.workers)])
        ours_rate = 3600 * many["n"] / many["wall"]
        say(f"merge-evolve, {args.workers} workers: {3600 / many['steady_per_eval']:.0f} evaluations/hour steady, "
            f"{ours_rate:.0f} including start-up ({many['wall']:.0f} s for {many['n']}); "
            f"busy fraction {many['busy']:.2f} (target >= 0.95); best {many['best']:.4f}")
        raced = run_evolve(work, "raced", [*common[:-2], "--num-workers", str(args.workers)])
        say(f"merge-evolve, {args.workers} workers, racing on (the default; baselines too): "
            f"{3600 * raced['n'] / raced['wall']:.0f} candidates/hour including start-up ({raced['wall']:.0f} s for "
            f"{raced['n']}), documents scored {raced['documents']:.2f} of full; best {raced['best']:.4f}")
        mk_rate, mk_note = mergekit_evolve(args.mergekit_python, work, args.max_fevals, args.workers, batch)
        if mk_rate is None:
            say(f"mergekit-evolve: {mk_note}")
        else:
            say(f"mergekit-evolve, {args.workers} workers: {mk_rate:.0f} evaluations/hour ({mk_note}); ours/theirs "
                f"{ours_rate / mk_rate:.2f}x, whole commands (target >= 3x)")
        if args.vllm:
            vllm = run_evolve(work, "vllm", [*common, "--vllm", "--no-ray"], python=str(REPO / ".venv-vllm/bin/python"))
            hf_rate, v_rate = 60 / one["steady_per_eval"], 60 / vllm["steady_per_eval"]
            say(f"vLLM evaluator (1 worker): {v_rate:.1f} evaluations/minute vs HF {hf_rate:.1f} -> {v_rate / hf_rate:.2f}x")
        if args.inputs:
            bench_inputs(work, args.inputs_fevals, batch, say)
    return 0


if __name__ == "__main__":
    sys.exit(main())
