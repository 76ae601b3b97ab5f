"""Build tiny Llama-shaped checkpoints for tests: real config.json, safetensors and tokenizer.

The models are random but structurally real (transformers loads them), so the merge engine is
exercised on the same file layout it meets on hub checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 96,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "float32",
}


def tiny_state_dict(config: dict, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights with Llama naming for ``config`` (deterministic in ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = h // heads

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.05).to(dtype)

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(vocab, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = rand(heads * head_dim, h)
        sd[p + "self_attn.k_proj.weight"] = rand(kv * head_dim, h)
        sd[p + "self_attn.v_proj.weight"] = rand(kv * head_dim, h)
        sd[p + "self_attn.o_proj.weight"] = rand(h, heads * head_dim)
        sd[p + "mlp.gate_proj.weight"] = rand(inter, h)
        sd[p + "mlp.up_proj.weight"] = rand(inter, h)
        sd[p + "mlp.down_proj.weight"] = rand(h, inter)
        sd[p + "input_layernorm.weight"] = (1 + rand(h)).to(dtype)
        sd[p + "post_attention_layernorm.weight"] = (1 + rand(h)).to(dtype)
    sd["model.norm.weight"] = (1 + rand(h)).to(dtype)
    if not config.get("tie_word_embeddings", False):
        sd["lm_head.weight"] = rand(vocab, h)
    return sd


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level fast tokenizer with ``vocab_size`` entries (no training, no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = [f"w{i}" for i in range(vocab_size - len(specials))]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(str(path))


def make_tiny_llama(
    path: Path,
    seed: int,
    *,
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
    tokenizer: bool = True,
    **config_overrides: object,
) -> Path:
    """Write a tiny Llama checkpoint to ``path`` and return it.

    ``shards > 1`` writes ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``
    like hub checkpoints do.  ``config_overrides`` change config.json (e.g. ``num_hidden_layers=6``).
    """
    config = {**TINY_CONFIG, **config_overrides}
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    path.mkdir(parents=True, exist_ok=True)
    sd = tiny_state_dict(config, seed, dtype)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if shards <= 1:
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = list(sd)
        weight_map: dict[str, str] = {}
        per = -(-len(names) // shards)
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: sd[n] for n in names[s * per : (s + 1) * per]}
            save_file(part, str(path / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer:
        write_tokenizer(path, config["vocab_size"])
    return path


def write_bpe_tokenizer(path: Path, vocab_size: int, corpus: list[str]) -> None:
    """A byte-level BPE trained on ``corpus`` (unlike the word-level one, it reads any text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(path))


def load_checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors checkpoint in folder ``path`` (one file or shards)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def with_added_tokens(src: Path, dst: Path, tokens: list[str], *, special: bool = False) -> Path:
    """A copy of model ``src`` in ``dst`` whose tokenizer adds ``tokens`` (as special tokens when
    ``special``, a chat fine-tune's ``<|im_start|>``), with as many rows appended to the embedding
    and ``lm_head`` (the first rows, reversed along the hidden axis) and ``vocab_size`` to match."""
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)  # (symlinked files are copied as files)
    tok = AutoTokenizer.from_pretrained(dst)
    if special:
        tok.add_special_tokens({"additional_special_tokens": list(tokens)})
    else:
        tok.add_tokens(list(tokens))
    tok.save_pretrained(dst)
    weights = load_file(str(dst / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in weights:
            weights[name] = torch.cat([weights[name], weights[name][: len(tokens)].flip(1).clone()])
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["vocab_size"] += len(tokens)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
