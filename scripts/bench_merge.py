"""Benchmark the merge engine against mergekit-yaml, and the in-memory API against memory bandwidth.

    python scripts/bench_merge.py [--params 500M] [--workdir /tmp/bench_merge] [--skip-mergekit]
                                  [--skip-commands] [--skip-in-memory] [--methods ties,della] [--repeat N]
                                  [--recipes ties,karcher]

1. Builds three random Llama checkpoints of about ``--params`` parameters (bf16 safetensors),
   once, in ``--workdir``.
2. Times the whole ``merge-yaml`` command and, when ``.venv-mergekit`` (or ``MERGEKIT_PYTHON``) is
   installed, the whole ``mergekit-yaml`` command on the same recipes (:data:`RECIPES`, or
   ``--recipes``), and prints wall time, CPU time, peak RSS, the ratios and the load average they were
   measured under.  Target: >= 3x faster wall, RSS no higher.
3. Times the in-memory API (inputs loaded once, fp32 or ``--in-memory-dtype``, one merge per
   method with per-layer gradient parameters into a preallocated state dict) and prints its effective memory traffic
   (every input byte read once + every output byte written once, per second) as a ratio to a
   preallocated torch copy of the same model (read + write bytes per second), each merge timed
   right after a copy and the median of those paired ratios printed (the bandwidth drifts).
   Targets: >= 0.8 for linear/task_arithmetic, >= 0.5 for ties/dare/della/breadcrumbs.
4. What inputs of other vocabularies and LoRA adapters cost a candidate's in-memory merge
   (``scripts/bench_inputs.py``; ``--skip-inputs`` leaves it out).  Target: ratios ~1.0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def llama_config(target_params: float) -> dict:
    """A Llama config of roughly ``target_params`` parameters (hidden 1024, GQA, untied)."""
    hidden, inter, vocab, heads, kv = 1024, 4864, 32000, 16, 8
    per_layer = 2 * hidden * hidden + 2 * hidden * (hidden * kv // heads) + 3 * hidden * inter
    layers = max(2, round((target_params - 2 * vocab * hidden) / per_layer))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }


def build_models(workdir: Path, target_params: float) -> list[Path]:
    """Three checkpoints: a base and two 'fine-tunes' (base + small random deltas)."""
    sys.path.insert(0, str(REPO / "tests"))
    from safetensors.torch import save_file

    from tiny_models import tiny_state_dict

    config = llama_config(target_params)
    paths = [workdir / name for name in ("base", "ft1", "ft2")]
    if all((p / "model.safetensors").exists() for p in paths):
        return paths
    base = tiny_state_dict(config, seed=0, dtype=torch.bfloat16)
    for i, path in enumerate(paths):
        path.mkdir(parents=True, exist_ok=True)
        if i == 0:
            sd = base
        else:
            gen = torch.Generator().manual_seed(100 + i)
            sd = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16)
                  for k, v in base.items()}
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(config, indent=2))
        del sd
    return paths


RECIPES = {
    "task_arithmetic": lambda b, m1, m2: {
        "merge_method": "task_arithmetic", "base_model": b, "dtype": "bfloat16",
        "models": [{"model": m1, "parameters": {"weight": 0.6}},
                   {"model": m2, "parameters": {"weight": 0.4}}]},
    "ties": lambda b, m1, m2: {
        "merge_method": "ties", "base_model": b, "dtype": "bfloat16",
        "models": [{"model": m1, "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": m2, "parameters": {"weight": 0.4, "density": 0.5}}]},
    "slerp": lambda b, m1, m2: {
        "merge_method": "slerp", "base_model": m1, "dtype": "bfloat16",
        "parameters": {"t": [0.0, 0.5, 1.0]},
        "models": [{"model": m1}, {"model": m2}]},
    "multislerp": lambda b, m1, m2: {
        "merge_method": "multislerp", "base_model": b, "dtype": "bfloat16",
        "models": [{"model": m1, "parameters": {"weight": 0.6}}, {"model": m2, "parameters": {"weight": 0.4}}]},
    "karcher": lambda b, m1, m2: {
        "merge_method": "karcher", "dtype": "bfloat16", "models": [{"model": m} for m in (b, m1, m2)]},
    "nearswap": lambda b, m1, m2: {
        "merge_method": "nearswap", "base_model": b, "dtype": "bfloat16", "parameters": {"t": 0.005},
        "models": [{"model": m1}]},
    "arcee_fusion": lambda b, m1, m2: {
        "merge_method": "arcee_fusion", "base_model": b, "dtype": "bfloat16", "models": [{"model": m1}]},
    "ram": lambda b, m1, m2: {
        "merge_method": "ram", "base_model": b, "dtype": "bfloat16", "parameters": {"epsilon": 0.005},
        "models": [{"model": m1}, {"model": m2}]},
    "ramplus_tl": lambda b, m1, m2: {
        "merge_method": "ramplus_tl", "base_model": b, "dtype": "bfloat16",
        "parameters": {"epsilon": 0.005, "r": 0.5, "alpha": 0.5}, "models": [{"model": m1}, {"model": m2}]},
}


def timed_command(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (MB) and CPU seconds (user + sys) of ``cmd``.

    Measured by a wrapper process of its own, so the RSS and CPU are those of ``cmd`` alone.
    """
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "dt = time.perf_counter() - t\n"
        "if r.returncode: sys.stderr.write(r.stderr[-3000:]); sys.exit(r.returncode)\n"
        "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(dt, u.ru_maxrss / 1024, u.ru_utime + u.ru_stime)\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{cmd[0]} failed: {out.stderr}")
    wall, rss, cpu = out.stdout.split()
    return float(wall), float(rss), float(cpu)


def _best_run(cmd: list[str], out_dir: Path, repeat: int) -> tuple[float, float, float]:
    """The fastest of ``repeat`` runs of ``cmd``, each writing a fresh ``out_dir``."""
    runs = []
    for _ in range(repeat):
        shutil.rmtree(out_dir, ignore_errors=True)  # both tools write a new directory
        os.sync()  # the previous command's output is not still being written back during this one
        runs.append(timed_command(cmd))
    return min(runs)


def _settle_page_cache(models: list[Path]) -> None:
    """Flush pending writes (freshly built checkpoints are still being written back) and read
    the inputs once, so every command, ours and mergekit's, starts with them in the page cache."""
    os.sync()
    for model in models:
        for path in sorted(model.glob("*.safetensors")):
            with open(path, "rb", buffering=0) as fh:
                while fh.read(64 << 20):
                    pass


def bench_commands(
    workdir: Path, models: list[Path], mergekit_bin: Path | None, repeat: int = 1, only: set[str] | None = None
) -> None:
    """Time the whole ``merge-yaml`` and ``mergekit-yaml`` commands on :data:`RECIPES`.

    Prints wall time, CPU time (user + sys, less sensitive to other load on the machine) and
    peak RSS of each, the speedup and the RSS ratio, and the 1-minute load average measured
    before the row (timings taken under load > ~0.5 per core are unreliable).
    """
    import yaml

    ours_bin = Path(sys.executable).parent / "merge-yaml"
    tag = models[0].parent.name
    _settle_page_cache(models)
    print(f"\n== whole command: merge-yaml vs mergekit-yaml ({models[0].parent}, best of {repeat}) ==")
    print(f"{'recipe':<16}{'load':>6}{'ours s':>8}{'cpu s':>7}{'MB':>7}"
          f"{'mk s':>8}{'cpu s':>7}{'MB':>7}{'speedup':>9}{'RSS ratio':>10}")
    for name, make in RECIPES.items():
        if only is not None and name not in only:
            continue
        recipe = workdir / f"{name}_{tag}.yml"
        recipe.write_text(yaml.safe_dump(make(*map(str, models))))
        load = os.getloadavg()[0]
        out = workdir / f"out_ours_{name}"
        ours = _best_run([str(ours_bin), str(recipe), str(out), "-q"], out, repeat)
        row = f"{name:<16}{load:>6.1f}{ours[0]:>8.1f}{ours[2]:>7.1f}{ours[1]:>7.0f}"
        if mergekit_bin is not None:
            out = workdir / f"out_mk_{name}"
            theirs = _best_run([str(mergekit_bin), str(recipe), str(out)], out, repeat)
            row += (f"{theirs[0]:>8.1f}{theirs[2]:>7.1f}{theirs[1]:>7.0f}"
                    f"{theirs[0] / ours[0]:>8.1f}x{ours[1] / theirs[1]:>10.2f}")
        print(row, flush=True)


def bench_in_memory(models: list[Path], only: set[str] | None = None, dtype: str = "float32") -> None:
    from merge_core.in_memory import InMemoryMerger
    from merge_core.planner import plan_merge
    from merge_core.recipe import recipe_from_dict

    torch.set_num_threads(os.cpu_count() or 1)
    b, m1, m2 = map(str, models)
    grad = [0.2, 0.9, 0.4, 0.7]
    recipes = {
        "linear": {"merge_method": "linear", "models": [
            {"model": m1, "parameters": {"weight": grad}}, {"model": m2, "parameters": {"weight": 0.5}}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": b, "models": [
            {"model": m1, "parameters": {"weight": grad}}, {"model": m2, "parameters": {"weight": 0.5}}]},
    }
    for method in ("ties", "dare_ties", "della", "breadcrumbs"):
        extra = {"epsilon": 0.1} if method == "della" else {}
        recipes[method] = {"merge_method": method, "base_model": b, "models": [
            {"model": m1, "parameters": {"weight": grad, "density": [0.3, 0.7], **extra}},
            {"model": m2, "parameters": {"weight": 0.5, "density": 0.5, **extra}}]}
    for method in ("multislerp", "karcher", "nearswap", "arcee_fusion", "ram", "ramplus_tl"):
        recipes[method] = {k: v for k, v in RECIPES[method](b, m1, m2).items() if k != "dtype"}
    plans = {k: plan_merge(recipe_from_dict({**r, "dtype": dtype}), seed=0) for k, r in recipes.items()
             if only is None or k in only or k in ("linear", "task_arithmetic")}
    print(f"\n== in-memory API ({dtype}, inputs loaded once) ==")
    t = time.perf_counter()
    merger = InMemoryMerger(plans["task_arithmetic"], dtype=getattr(torch, dtype))  # loads all three models
    print(f"load inputs: {time.perf_counter() - t:.1f} s, {merger.input_bytes / 1e9:.2f} GB "
          f"({merger.shared_bytes / 1e9:.2f} GB mapped from the page cache)")
    target = merger.merged_state_dict(plans["linear"])  # preallocated output, reused below
    out_bytes = sum(v.numel() * v.element_size() for v in target.values())


    def copy_once(src: dict[str, torch.Tensor]) -> float:
        return _timeit(lambda: [target[k].copy_(v) for k, v in src.items()])

    # The machine's memory bandwidth drifts (other tenants, by up to 2x within a minute here):
    # each warm merge is timed right after a copy, and the ratio is the median over such pairs.
    print(f"{'method':<18}{'first s':>9}{'warm s':>9}{'GB/s':>8}{'copy GB/s':>11}{'ratio':>8}"
          "   (warm: fastest of 5; copy: median; ratio: median of copy/merge pairs)")
    for method, plan in plans.items():
        # A search uses one method: drop what the previous method cached (sorted magnitudes,
        # random fields, ranks), else six methods' caches outgrow memory at 500M.
        merger.clear_caches()
        inputs = sum(1 for _ in {s.model for task in plan.tasks for s in task.sources})
        traffic = inputs * out_bytes + out_bytes  # every input read once + output written once
        first = _timeit(lambda: merger.merge_into(plan, target))
        # The copy's source exists only for the timed pairs: while the first merge builds a
        # method's caches (DELLA's peak at 500M), 2 GB more would not fit in 24 GB.
        src = {k: v.clone() for k, v in target.items()}
        pairs = []
        for _ in range(5):
            copy_s = copy_once(src)
            pairs.append((copy_s, _timeit(lambda: merger.merge_into(plan, target))))
        del src
        ratio = statistics.median((traffic / warm) / (2 * out_bytes / copy_s) for copy_s, warm in pairs)
        warm = min(w for _, w in pairs)
        copy_bw = 2 * out_bytes / statistics.median(c for c, _ in pairs)
        print(f"{method:<18}{first:>9.2f}{warm:>9.2f}{traffic / warm / 1e9:>8.1f}{copy_bw / 1e9:>11.1f}"
              f"{ratio:>8.2f}", flush=True)


def _timeit(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="500M", help="approximate model size, e.g. 500M, 100M")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_merge"))
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--skip-in-memory", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="runs per command; the fastest counts")
    parser.add_argument("--methods", default=None,
                        help="in-memory methods to time, comma-separated (default: all)")
    parser.add_argument("--skip-commands", action="store_true", help="skip the whole-command timings")
    parser.add_argument("--skip-inputs", action="store_true",
                        help="skip the per-candidate cost of merged vocabularies and LoRA adapters")
    parser.add_argument("--recipes", default=None,
                        help=f"whole-command recipes to time, comma-separated (default: all of {', '.join(RECIPES)})")
    parser.add_argument("--in-memory-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="in-memory merge dtype: float32 casts the bf16 models (private copies), "
                             "bfloat16 keeps their dtype (inputs mapped from the page cache, unless "
                             "MERGE_CORE_SHARE_INPUTS=0)")
    args = parser.parse_args()
    target = float(args.params.rstrip("MB")) * (1e9 if args.params.endswith("B") else 1e6)
    args.workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    models = build_models(args.workdir / args.params, target)
    from merge_core.tensor_io import read_header

    n = sum(torch.Size(shape).numel() for _, shape in read_header(models[0] / "model.safetensors").values())
    print(f"models: 3 x {n / 1e6:.0f}M params bf16 (ready in {time.perf_counter() - t:.0f} s)")
    mk_python = os.environ.get("MERGEKIT_PYTHON") or str(REPO / ".venv-mergekit/bin/python")
    mk_bin = Path(mk_python).parent / "mergekit-yaml"
    mergekit = None if args.skip_mergekit or not mk_bin.exists() else mk_bin
    if not args.skip_commands:
        bench_commands(args.workdir, models, mergekit, max(1, args.repeat),
                       set(args.recipes.split(",")) if args.recipes else None)
    if not args.skip_in_memory:
        bench_in_memory(models, set(args.methods.split(",")) if args.methods else None, args.in_memory_dtype)
    if not args.skip_inputs:
        from bench_inputs import bench_input_kinds

        bench_input_kinds(args.workdir / args.params, models)


if __name__ == "__main__":
    main()
