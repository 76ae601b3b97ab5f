#!/usr/bin/env python
"""What inputs of other vocabularies and LoRA adapters cost an in-memory merge, per candidate.

    python scripts/bench_inputs.py [--params 500M] [--workdir /tmp/bench_merge] [--repeats 5]

(Also the last section of ``scripts/bench_merge.py``.)  On the three random Llama checkpoints of
``bench_merge.py`` (base, ft1, ft2; bf16), the same task-arithmetic recipe with per-layer weights,
merged in memory in float32 as an evolve worker merges each candidate, three ways:

- ``same vocabulary``: base, ft1, ft2 (one word-level 32000-token tokenizer);
- ``merged vocabulary``: ft2 replaced by a copy with two added chat tokens (32002 rows),
  ``tokenizer_source: union`` (every model's embedding and lm_head rows re-indexed onto the union);
- ``LoRA adapter``: ft1 replaced by ``base+adapter`` (rank 16 on all seven linear layers).

For each: the one-time cost (loading the inputs: re-indexing rows, applying the adapter) and the
per-candidate merge (median of ``--repeats`` warm merges, each with other weights, as the search
asks).  The last line reads ``per-candidate merge vs same vocabulary: merged vocabulary X,
LoRA adapter Y`` (ratios of medians, measured in this run; ~1.0 = no per-candidate cost).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))  # tiny_models: tokenizers and added tokens

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]


def with_tokenizer(model: Path, folder: Path, vocab_size: int) -> Path:
    """``folder``: links to ``model``'s files plus a word-level tokenizer (the benchmark models
    of bench_merge.py have none; their folders stay as they are)."""
    from tiny_models import write_tokenizer

    if not (folder / "tokenizer.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        for entry in model.iterdir():
            if entry.is_file() and not (folder / entry.name).exists():
                os.symlink(entry.resolve(), folder / entry.name)
        write_tokenizer(folder, vocab_size)
    return folder


def chat_variant(src: Path, dst: Path) -> Path:
    """``src`` with the two chat tokens added (rows appended), built once."""
    from tiny_models import with_added_tokens

    if not (dst / "model.safetensors").exists():
        shutil.rmtree(dst, ignore_errors=True)
        with_added_tokens(src, dst, CHAT_TOKENS, special=True)
    return dst


def write_adapter(model: Path, out: Path, rank: int = 16) -> Path:
    """A rank-``rank`` LoRA adapter of ``model`` (PEFT's saved layout, random A and B)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from merge_core import lora

    if (out / lora.ADAPTER_WEIGHTS).exists():
        return out
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        for name in f.keys():
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module.rsplit(".", 1)[-1] in LORA_TARGETS:
                out_dim, in_dim = f.get_slice(name).get_shape()
                tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_dim, generator=gen) * 0.01
                tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / lora.ADAPTER_WEIGHTS))
    (out / lora.ADAPTER_CONFIG).write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(LORA_TARGETS)}))
    return out


def recipe(base: str, m1: str, m2: str, weights: list[float], **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32", **extra,
            "models": [{"model": m1, "parameters": {"weight": weights}},
                       {"model": m2, "parameters": {"weight": weights[::-1]}}]}


def measure(label: str, make, repeats: int) -> float:
    """Print and return the median warm per-candidate merge seconds of ``make(weights)`` recipes."""
    from merge_core.in_memory import InMemoryMerger
    from merge_core.planner import Planner
    from merge_core.recipe import recipe_from_dict

    planner = Planner()
    start = time.perf_counter()
    first = planner.plan(recipe_from_dict(make([0.5, 0.5, 0.5, 0.5])), seed=0)
    if first.vocabulary is not None:
        planner.vocabulary = first.vocabulary  # the run's vocabulary, fixed (as an evolve worker)
    merger = InMemoryMerger(first, dtype=torch.float32)
    target = merger.merged_state_dict(first)
    setup = time.perf_counter() - start
    times = []
    for i in range(repeats + 1):  # the first merge builds nothing here (task arithmetic), but warms
        w = [0.2 + 0.1 * ((i + k) % 7) for k in range(4)]
        plan = planner.plan(recipe_from_dict(make(w)), seed=0)
        t = time.perf_counter()
        merger.merge_into(plan, target)
        times.append(time.perf_counter() - t)
    median = statistics.median(times[1:])
    rows = target["model.embed_tokens.weight"].shape[0]
    print(f"{label:<20}{setup:>10.1f}{median:>12.3f}{rows:>8}", flush=True)
    del merger, target
    return median


def bench_input_kinds(workdir: Path, models: list[Path], repeats: int = 5) -> None:
    """The section described in the module docstring, on ``models`` (base, ft1, ft2)."""
    torch.set_num_threads(os.cpu_count() or 1)
    vocab = json.loads((models[0] / "config.json").read_text())["vocab_size"]
    models = [with_tokenizer(model, workdir / "with_tokenizer" / model.name, vocab) for model in models]
    base, ft1, ft2 = models
    chat = chat_variant(ft2, workdir / f"{ft2.name}_chat")
    adapter = write_adapter(base, workdir / f"{ft1.name}_lora")
    b, m1, m2 = map(str, models)
    print(f"\n== input kinds, in-memory task_arithmetic (float32), per candidate: median of {repeats} ==")
    print(f"{'inputs':<20}{'setup s':>10}{'merge s':>12}{'rows':>8}")
    plain = measure("same vocabulary", lambda w: recipe(b, m1, m2, w), repeats)
    union = measure("merged vocabulary", lambda w: recipe(b, m1, str(chat), w, tokenizer_source="union"), repeats)
    lora = measure("LoRA adapter", lambda w: recipe(b, f"{b}+{adapter}", m2, w), repeats)
    print(f"per-candidate merge vs same vocabulary: merged vocabulary {union / plain:.2f}, "
          f"LoRA adapter {lora / plain:.2f}")


def main() -> None:
    from bench_merge import build_models

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="500M")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_merge"))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    target = float(args.params.rstrip("MB")) * (1e9 if args.params.endswith("B") else 1e6)
    models = build_models(args.workdir / args.params, target)
    bench_input_kinds(args.workdir / args.params, models, args.repeats)


if __name__ == "__main__":
    main()
