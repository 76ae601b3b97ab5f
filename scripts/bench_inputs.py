#!/usr/bin/env python
"""What inputs of other vocabularies and LoRA adapters cost an in-memory merge, per candidate.

    python scripts/bench_inputs.py [--params 500M] [--workdir /tmp/bench_merge] [--repeats 5]

(Also the last section of ``scripts/bench_merge.py``.)  On the three random Llama checkpoints of
``bench_merge.py`` (base, ft1, ft2; bf16), the same task-arithmetic recipe with per-layer weights,
merged in memory in the recipe's dtype (bfloat16) as an evolve worker merges each candidate,
three ways:

- ``same vocabulary``: base, ft1, ft2 (one word-level 32000-token tokenizer);
- ``merged vocabulary``: ft2 replaced by a copy with two added chat tokens (32002 rows),
  ``tokenizer_source: union`` (every model's embedding and lm_head rows re-indexed onto the union);
- ``LoRA adapter``: ft1 replaced by ``base+adapter`` (rank 16 on all seven linear layers).

For each: the one-time cost (loading the inputs: re-indexing rows, applying the adapter) and the
per-candidate merge (``--repeats`` rounds in which the three merge in turn, each round with other
weights, as the search asks; the memory bandwidth drifts, so each ratio is the median over rounds
of the time over that round's same-vocabulary time).  The last line reads ``per-candidate merge
vs same vocabulary: merged vocabulary X, LoRA adapter Y`` (~1.0 = no per-candidate cost).
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
    return {"merge_method": "task_arithmetic", "base_model": base, "dtype": "bfloat16", **extra,
            "models": [{"model": m1, "parameters": {"weight": weights}},
                       {"model": m2, "parameters": {"weight": weights[::-1]}}]}


class Kind:
    """One way of giving the inputs: its planner (the run's vocabulary fixed, as an evolve
    worker's), its merger (inputs loaded once) and a preallocated output."""

    def __init__(self, label: str, make) -> None:
        from merge_core.in_memory import InMemoryMerger
        from merge_core.planner import Planner
        from merge_core.recipe import recipe_from_dict

        self.label, self.make = label, make
        self.planner = Planner()
        start = time.perf_counter()
        first = self.planner.plan(recipe_from_dict(make([0.5] * 4)), seed=0)
        if first.vocabulary is not None:
            self.planner.vocabulary = first.vocabulary
        self.merger = InMemoryMerger(first)  # the recipe's dtype (bf16), as evolve workers merge
        self.target = self.merger.merged_state_dict(first)
        self.setup = time.perf_counter() - start
        self.times: list[float] = []

    def merge(self, weights: list[float]) -> float:
        """Seconds of one candidate's merge (the plan is made first, untimed, as in a worker)."""
        from merge_core.recipe import recipe_from_dict

        plan = self.planner.plan(recipe_from_dict(self.make(weights)), seed=0)
        start = time.perf_counter()
        self.merger.merge_into(plan, self.target)
        return time.perf_counter() - start


def bench_input_kinds(workdir: Path, models: list[Path], repeats: int = 7) -> None:
    """The section described in the module docstring, on ``models`` (base, ft1, ft2)."""
    torch.set_num_threads(os.cpu_count() or 1)
    vocab = json.loads((models[0] / "config.json").read_text())["vocab_size"]
    models = [with_tokenizer(model, workdir / "with_tokenizer" / model.name, vocab) for model in models]
    base, ft1, ft2 = models
    chat = chat_variant(ft2, workdir / f"{ft2.name}_chat")
    adapter = write_adapter(base, workdir / f"{ft1.name}_lora")
    b, m1, m2 = map(str, models)
    kinds = [Kind("same vocabulary", lambda w: recipe(b, m1, m2, w)),
             Kind("merged vocabulary", lambda w: recipe(b, m1, str(chat), w, tokenizer_source="union")),
             Kind("LoRA adapter", lambda w: recipe(b, f"{b}+{adapter}", m2, w))]
    # The memory bandwidth drifts (see bench_merge.py): the kinds merge in turn, round by round,
    # and each ratio is the median over rounds of its time / the same round's plain time.
    ratios: dict[str, list[float]] = {k.label: [] for k in kinds}
    for i in range(repeats + 1):  # round 0 warms up
        weights = [0.2 + 0.1 * ((i + k) % 7) for k in range(4)]
        times = [kind.merge(weights) for kind in kinds]
        if i:
            for kind, t in zip(kinds, times):
                kind.times.append(t)
                ratios[kind.label].append(t / times[0])
    print(f"\n== input kinds, in-memory task_arithmetic (bfloat16, as evolve workers), per candidate: "
          f"{repeats} rounds ==")
    print(f"{'inputs':<20}{'setup s':>10}{'merge s':>12}{'ratio':>8}{'rows':>8}")
    for kind in kinds:
        print(f"{kind.label:<20}{kind.setup:>10.1f}{statistics.median(kind.times):>12.3f}"
              f"{statistics.median(ratios[kind.label]):>8.2f}{kind.target['model.embed_tokens.weight'].shape[0]:>8}")
    print(f"per-candidate merge vs same vocabulary: merged vocabulary "
          f"{statistics.median(ratios['merged vocabulary']):.2f}, LoRA adapter "
          f"{statistics.median(ratios['LoRA adapter']):.2f}")


def main() -> None:
    from bench_merge import build_models

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="500M")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_merge"))
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    target = float(args.params.rstrip("MB")) * (1e9 if args.params.endswith("B") else 1e6)
    models = build_models(args.workdir / args.params, target)
    bench_input_kinds(args.workdir / args.params, models, args.repeats)


if __name__ == "__main__":
    main()
