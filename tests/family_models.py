"""Tiny random checkpoints of every decoder family the installed transformers builds, for tests.

Each family is a transformers config (hidden 32, 4 layers, 96 tokens) built with
``AutoModelForCausalLM.from_config`` and written with ``save_pretrained``: the file layout, the
tensor names and config.json are exactly what hub checkpoints of that family look like under the
installed transformers.  :func:`build_family` writes a base and fine-tune-like variants (the
base plus small random deltas, so task vectors are small and sign elections non-trivial).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

COMMON: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 128, "pad_token_id": 0,
    "bos_token_id": 1, "eos_token_id": 2,
}
_MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}

# name -> (model_type, config overrides).  Names are the families the README lists as tested.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {"tie_word_embeddings": False}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2": ("qwen2", {}),
    "qwen2_moe": ("qwen2_moe", {**_MOE, "num_experts": 4, "shared_expert_intermediate_size": 48}),
    "qwen3": ("qwen3", {"head_dim": 8}),
    "qwen3_moe": ("qwen3_moe", {**_MOE, "num_experts": 4, "head_dim": 8}),
    "glm4_moe": ("glm4_moe", {**_MOE, "n_routed_experts": 4, "first_k_dense_replace": 1, "n_group": 1,
                              "topk_group": 1, "head_dim": 8}),
    "granitemoe": ("granitemoe", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "gemma": ("gemma", {"head_dim": 8}),
    "gemma2": ("gemma2", {"head_dim": 8}),
    "gemma3_text": ("gemma3_text", {"head_dim": 8}),
    "phi3": ("phi3", {}),
    "olmo": ("olmo", {}),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {}),
    "cohere": ("cohere", {"use_qk_norm": True}),
    "cohere2": ("cohere2", {}),
    "starcoder2": ("starcoder2", {}),
    "glm4": ("glm4", {"head_dim": 8}),
    "phi": ("phi", {}),
    "stablelm": ("stablelm", {}),
    "gpt2": ("gpt2", {"n_embd": 32, "n_layer": 4, "n_head": 4}),
    "gpt_bigcode": ("gpt_bigcode", {"n_embd": 32, "n_layer": 4, "n_head": 4}),
    "exaone4": ("exaone4", {}),
    "arcee": ("arcee", {}),
    "apertus": ("apertus", {}),
    "smollm3": ("smollm3", {}),
}
# Families mergekit 0.1.5 refuses as transformers 5 writes them (its definitions name tensors
# these checkpoints do not have: GPT-NeoX's attention.bias buffer, Falcon's new-architecture
# norms, Cohere's q/k norms), merged by ours only.
OURS_ONLY: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt_neox": ("gpt_neox", {}),
    "falcon": ("falcon", {}),
    "cohere_plain": ("cohere", {}),
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe", "granitemoe")


# One mergekit 0.1.5 process merging every recipe ROOT/recipes/<case>.yml listed in
# ROOT/cases.json into ROOT/mergekit/<case>; ROOT/status.json says "ok" or the error per case,
# and "<family>__inferred" whether mergekit has no definition of the family (run with
# ``python -c MERGEKIT_ORACLE ROOT`` in the oracle's venv: its import costs seconds, once).
MERGEKIT_ORACLE = r"""
import json, logging, sys, traceback
logging.disable(logging.WARNING)
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
import yaml
from mergekit.architecture import arch_info_for_config
from transformers import AutoConfig
root = sys.argv[1]
status = {}
for case in json.load(open(f"{root}/cases.json")):
    if case.endswith("__linear"):  # families mergekit has no definition of: it infers their layout
        first = yaml.safe_load(open(f"{root}/recipes/{case}.yml"))["models"][0]["model"]
        known = arch_info_for_config(AutoConfig.from_pretrained(first)) is not None
        status[case.split("__")[0] + "__inferred"] = "no" if known else "yes"
    try:
        config = MergeConfiguration.model_validate(yaml.safe_load(open(f"{root}/recipes/{case}.yml")))
        run_merge(config, f"{root}/mergekit/{case}", options=MergeOptions(quiet=True, random_seed=0))
        status[case] = "ok"
    except Exception as exc:
        status[case] = f"{type(exc).__name__}: {exc}"[:500]
json.dump(status, open(f"{root}/status.json", "w"))
"""


def family_config(name: str, **overrides: Any) -> Any:
    """The transformers config of family ``name`` (float32)."""
    from transformers import AutoConfig

    model_type, extra = {**FAMILIES, **OURS_ONLY}[name]
    return AutoConfig.for_model(model_type, **{**COMMON, **extra, **overrides}, torch_dtype="float32")


def _perturbed(base: Path, target: Path, seed: int, scale: float) -> Path:
    """``base`` with every floating tensor plus ``scale`` x its own RMS x N(0, 1) noise."""
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():
        if not item.name.endswith(".safetensors"):
            shutil.copy(item, target / item.name)
    gen = torch.Generator().manual_seed(seed)
    for file in base.glob("*.safetensors"):
        tensors = load_file(str(file))
        out = {}
        for name, t in tensors.items():
            if t.is_floating_point():
                rms = t.float().pow(2).mean().sqrt().clamp_min(1e-3)
                t = t + scale * rms * torch.randn(t.shape, generator=gen, dtype=t.dtype)
            out[name] = t.contiguous()
        save_file(out, str(target / file.name), metadata={"format": "pt"})
    return target


TASK_VOCAB = 320  # the byte-level BPE that reads the toy tasks


def task_corpus() -> list[str]:
    """Every text field of the toy tasks (eval_tasks/data), to train a tokenizer that reads them."""
    corpus = []
    for path in sorted((Path(__file__).resolve().parents[1] / "eval_tasks" / "data").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            corpus.extend(str(v) for v in json.loads(line).values())
    return corpus


def build_family(name: str, root: Path, variants: int = 3, *, tokenizer: bool = True, task_tokenizer: bool = False,
                 **overrides: Any) -> dict[str, Path]:
    """``base`` and ``m1``..``m<variants>`` of family ``name`` under ``root/name``; with
    ``task_tokenizer`` the vocabulary is a byte-level BPE that reads the toy tasks."""
    from transformers import AutoModelForCausalLM

    from tiny_models import write_bpe_tokenizer, write_tokenizer

    if task_tokenizer:
        overrides = {"vocab_size": TASK_VOCAB, **overrides}
    config = family_config(name, **overrides)
    torch.manual_seed(sum(map(ord, name)))
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():  # zero-initialised norms and biases would make some merges trivial
        gen = torch.Generator().manual_seed(1)
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=gen))
    base = root / name / "base"
    model.save_pretrained(str(base))
    if task_tokenizer:
        write_bpe_tokenizer(base, TASK_VOCAB, task_corpus())
    elif tokenizer:
        write_tokenizer(base, COMMON["vocab_size"])
    out = {"base": base}
    for i in range(1, variants + 1):
        out[f"m{i}"] = _perturbed(base, root / name / f"m{i}", seed=100 * i + len(name), scale=0.1)
    return out


def load_and_run(path: Path) -> torch.Tensor:
    """Load the checkpoint in ``path`` with transformers (every tensor used, none missing) and run
    a forward pass; the logits."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, dtype=torch.float32)
    missing = [k for k in info["missing_keys"] if not k.endswith("inv_freq")]
    assert not missing and not info["unexpected_keys"] and not info["mismatched_keys"], (path, info)
    config = json.loads((path / "config.json").read_text())
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    ids = torch.arange(3, 3 + 12).reshape(2, 6) % vocab
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 6, vocab), logits.shape
    assert torch.isfinite(logits).all(), path
    return logits


__all__ = ["FAMILIES", "MERGEKIT_ORACLE", "MOE_FAMILIES", "OURS_ONLY", "TASK_VOCAB", "build_family", "family_config", "load_and_run", "task_corpus"]
