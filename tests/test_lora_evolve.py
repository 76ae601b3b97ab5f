"""merge-evolve with a LoRA adapter among its models: the search runs, the export names the
``base+adapter`` reference, and each worker merges the adapter once, never per candidate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

pytest.importorskip("lm_eval")

from evolve.cli import main as merge_evolve  # noqa: E402
from merge_core import lora  # noqa: E402


def write_adapter(model: Path, out: Path, targets: tuple[str, ...] = ("q_proj", "v_proj"), rank: int = 2,
                  seed: int = 0) -> Path:
    """A LoRA adapter of ``model`` in PEFT's saved layout (random A and B)."""
    gen = torch.Generator().manual_seed(seed)
    base = load_file(str(model / "model.safetensors"))
    tensors = {}
    for name, weight in base.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.split(".")[-1] in targets:
            out_dim, in_dim = weight.shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_dim, generator=gen) * 0.1
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.1
    out.mkdir(parents=True)
    save_file(tensors, str(out / lora.ADAPTER_WEIGHTS))
    (out / lora.ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                                                       "target_modules": list(targets)}))
    return out


@pytest.mark.slow
def test_an_evolve_run_with_an_adapter_merges_it_once_per_worker(task_models, tmp_path, monkeypatch):
    adapter = write_adapter(task_models["e1"], tmp_path / "adapter")
    reads: dict[str, int] = {}
    real_read = lora.LoraReader.read

    def counting_read(self, name):
        if name in self.adapter.deltas:
            reads[name] = reads.get(name, 0) + 1
        return real_read(self, name)

    monkeypatch.setattr(lora.LoraReader, "read", counting_read)
    ref = f"{task_models['e1']}+{adapter}"
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump({
        "genome": {"models": [ref, str(task_models["e2"])], "merge_method": "task_arithmetic",
                   "base_model": str(task_models["base"]), "layer_granularity": 2},
        "tasks": [{"name": "toy_arith"}], "limit": 8, "apply_chat_template": False}))
    store = tmp_path / "run"
    argv = [str(config), "--storage-path", str(store), "--no-ray", "-q", "--max-fevals", "6",
            "--force-population-size", "3", "--no-save-final-model"]
    assert merge_evolve(argv) == 0
    assert reads and set(reads.values()) == {1}, reads  # once each, for 6 candidates and the baselines
    best = (store / "best_config.yaml").read_text()
    assert ref in best
    records = [json.loads(line) for line in (store / "evaluations.jsonl").read_text().splitlines()]
    assert any(r.get("kind") == "baseline" and r.get("model") == ref and r["status"] == "ok" for r in records)
