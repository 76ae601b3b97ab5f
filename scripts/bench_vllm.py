"""vLLM evaluator vs HF evaluator on the toy zoo: engine start, weight push, evaluation time.

Run with the vLLM venv (bash scripts/setup_vllm.sh):
    .venv-vllm/bin/python scripts/bench_vllm.py [--zoo zoo] [--limit N] [--repeats 5] [--threads 1]
                                                [--device cpu|cuda]

(``--zoo``: any folder with ``base``, ``spatial`` and ``arith`` models that read the toy tasks;
scripts/gpu_check.sh passes random ones.  ``--device cuda``: both backends on the GPU, fp32.)

Times, after a warm-up evaluation of each backend:
  engine:  importing vllm, then VLLMEvaluator() from zoo/base (engine start + lm-eval wrapper),
           and HFEvaluator()
  push:    VLLMEvaluator.push_weights of a whole expert (fp32 and bf16 state dicts), with the
           prefix-cache reset, alternating experts
  eval:    evaluate() on toy_spatial + toy_arith + toy_prompt_format (multiple choice), and on
           the test-only generate_until task toy_arith_gen, interleaved between backends
Prints medians; scores of both backends on the last pushed expert, as a sanity check.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", type=Path, default=REPO / "zoo")
    ap.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    from evolve.config import TaskConfig
    from evolve.evaluation import EvalSettings
    from evolve.evaluation.hf import HFEvaluator
    from evolve.evaluation.vllm import VLLMEvaluator, prepare_environment

    settings = EvalSettings(limit=args.limit, device=args.device, dtype="float32", builtin_tasks=False,
                            threads=args.threads, task_search_paths=(REPO / "tests" / "data" / "vllm_tasks",),
                            vllm={"gpu_memory_utilization": 0.3} if args.device == "cuda" else None)
    mc = [TaskConfig(name="toy_spatial"), TaskConfig(name="toy_arith"), TaskConfig(name="toy_prompt_format")]
    gen = [TaskConfig(name="toy_arith_gen", metric="exact_match,none")]

    prepare_environment(cpu=args.device == "cpu", threads=args.threads, quiet=True)
    start = time.perf_counter()
    import evolve.evaluation.vllm_lm  # noqa: F401  (vllm and lm-eval's VLLM wrapper: once per process)

    import_s = time.perf_counter() - start
    start = time.perf_counter()
    vllm = VLLMEvaluator(args.zoo / "base", settings, threads=args.threads)
    engine_s = time.perf_counter() - start
    start = time.perf_counter()
    hf = HFEvaluator(args.zoo / "base", settings)
    hf_load_s = time.perf_counter() - start
    print(f"import vllm: {import_s:.2f} s; engine start (VLLMEvaluator): {engine_s:.2f} s; "
          f"HFEvaluator load: {hf_load_s:.2f} s")

    experts = {name: load_file(str(args.zoo / name / "model.safetensors")) for name in ("spatial", "arith")}
    pushes: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for i in range(2 * args.repeats):
        name = ("spatial", "arith")[i % 2]
        pushes["fp32"].append(vllm.push_weights(experts[name]))
        pushes["bf16"].append(vllm.push_weights({k: v.to(torch.bfloat16) for k, v in experts[name].items()}))
    for kind, times in pushes.items():
        median_ms = 1000 * statistics.median(times)
        print(f"push ({kind} state dict, {len(experts['arith'])} tensors): median {median_ms:.1f} ms")

    # Same weights in both backends for the sanity check: the last expert pushed, fp32.
    name = "arith"
    vllm.push_weights(experts[name])
    hf.model.load_state_dict(experts[name])
    for label, tasks in (("multiple choice", mc), ("generate_until", gen)):
        scores = {b: e.evaluate(tasks).scores for b, e in (("vllm", vllm), ("hf", hf))}  # warm-up
        times: dict[str, list[float]] = {"vllm": [], "hf": []}
        for _ in range(args.repeats):
            for backend, evaluator in (("vllm", vllm), ("hf", hf)):
                times[backend].append(evaluator.evaluate(tasks).seconds)
        docs = sum(vllm.evaluate(tasks).samples.values())
        print(f"eval {label} ({docs} docs): vLLM {statistics.median(times['vllm']):.2f} s, "
              f"HF {statistics.median(times['hf']):.2f} s; scores ({name}) vLLM {scores['vllm']} HF {scores['hf']}")
    vllm.close()


if __name__ == "__main__":
    main()
