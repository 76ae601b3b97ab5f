"""Per-evaluation overhead of evolve.evaluation.hf.HFEvaluator vs lm_eval.simple_evaluate.

Builds a tiny random Llama with a byte-level BPE tokenizer trained on the toy tasks' text
(or uses --model DIR), then times, interleaved and after a warm-up:
  simple:   lm_eval.simple_evaluate(model=<plain HFLM on the same model>, task_manager=<prebuilt, local only>)
  ours:     HFEvaluator.evaluate (cached task objects)
  model:    time spent in forward passes (HFLM._model_call) during `ours`
Usage: python scripts/bench_eval.py [--hidden 128 --layers 4] [--limit 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import lm_eval  # noqa: E402
import torch  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from evolve.config import TaskConfig  # noqa: E402
from evolve.evaluation import EvalSettings, default_task_dir  # noqa: E402
from evolve.evaluation.hf import HFEvaluator  # noqa: E402
from evolve.evaluation.quiet import quiet  # noqa: E402


def build_model(root: Path, hidden: int, layers: int) -> Path:
    from test_evaluation import VOCAB, _train_bpe

    from tiny_models import make_tiny_llama

    heads = max(4, hidden // 32)
    path = make_tiny_llama(
        root / "m", seed=0, tokenizer=False, vocab_size=VOCAB, hidden_size=hidden,
        intermediate_size=hidden * 3, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, max_position_embeddings=512,
    )
    _train_bpe(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model or build_model(Path(tmp.name), args.hidden, args.layers)
    specs = [TaskConfig(name="toy_spatial"), TaskConfig(name="toy_arith"), TaskConfig(name="toy_prompt_format")]
    names = [s.name for s in specs]
    settings = EvalSettings(limit=args.limit, batch_size=args.batch_size, device="cpu",
                            builtin_tasks=False, threads=args.threads)
    ev = HFEvaluator(model_dir, settings)
    n_params = sum(p.numel() for p in ev.model.parameters())
    tm = TaskManager(include_path=[str(default_task_dir())], include_defaults=False)

    from lm_eval.models.huggingface import HFLM

    with quiet(True):  # a plain HFLM on the same model object, for simple_evaluate
        plain = HFLM(pretrained=ev.model, tokenizer=ev.tokenizer, batch_size=args.batch_size)

    model_seconds = [0.0]
    inner = ev.lm._model_call

    def timed_model_call(*a, **kw):
        t = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            model_seconds[0] += time.perf_counter() - t

    ev.lm._model_call = timed_model_call  # bench-only instrumentation: forward passes

    def run_simple() -> dict:
        with quiet(True):
            return lm_eval.simple_evaluate(model=plain, tasks=names, limit=args.limit, task_manager=tm,
                                           log_samples=False, batch_size=args.batch_size)["results"]

    def run_ours():
        model_seconds[0] = 0.0
        t, c = time.perf_counter(), time.process_time()
        result = ev.evaluate(specs)
        ours.append(time.perf_counter() - t)
        ours_cpu.append(time.process_time() - c)
        model.append(model_seconds[0])
        return result

    ours, simple, model, ours_cpu, simple_cpu = [], [], [], [], []
    run_ours(), run_simple()  # warm-up (first forward passes, task caches)
    ours.clear(), model.clear(), ours_cpu.clear()
    for i in range(args.repeats):  # interleaved, alternating order: the machine may be shared
        for step in ((run_ours, run_simple) if i % 2 == 0 else (run_simple, run_ours)):
            if step is run_ours:
                r_ours = run_ours()
            else:
                t, c = time.perf_counter(), time.process_time()
                r_simple = run_simple()
                simple.append(time.perf_counter() - t)
                simple_cpu.append(time.process_time() - c)
        assert r_ours.scores == {n: r_simple[n]["acc,none"] for n in names}, (r_ours.scores, r_simple)
    med = statistics.median
    print(f"model {n_params / 1e6:.2f}M params, {len(names)} tasks x {args.limit} docs, "
          f"batch {args.batch_size}, torch threads {torch.get_num_threads()}, repeats {args.repeats}")
    print(f"simple_evaluate (prebuilt lm + TaskManager): median {med(simple):.3f} s  {[round(x, 3) for x in simple]}")
    print(f"HFEvaluator.evaluate:                        median {med(ours):.3f} s  {[round(x, 3) for x in ours]}")
    print(f"  of which forward passes (HFLM._model_call): median {med(model):.3f} s")
    print(f"evaluate() time outside forward passes:      {100 * (med(ours) / med(model) - 1):.1f} % of forward time")
    print(f"evaluate() vs simple_evaluate:               {100 * (med(ours) / med(simple) - 1):+.1f} %")
    # Process CPU time is steadier than wall time on a shared machine (meaningful with --threads 1).
    print(f"CPU time: simple_evaluate median {med(simple_cpu):.3f} s, evaluate() median {med(ours_cpu):.3f} s "
          f"({100 * (med(ours_cpu) / med(simple_cpu) - 1):+.1f} %)")


if __name__ == "__main__":
    main()
