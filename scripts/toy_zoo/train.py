"""Deterministic training of the tiny Llama models (explicit generators, fixed threads, fp32).

Each example is a (context, continuation) pair tokenized the way lm-eval's HF backend does it
(encode ``context + continuation``, then drop the context's tokens): the loss covers the
continuation tokens only. For the base, the context is empty and the whole document is scored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

IGNORE = -100


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings of one training run."""

    steps: int
    lr: float
    batch_size: int
    warmup_frac: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0


def make_config(tokenizer: PreTrainedTokenizerFast, hidden: int, layers: int, heads: int,
                intermediate: int, max_len: int) -> LlamaConfig:
    """The Llama architecture of the zoo (all models share it)."""
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate,
        max_position_embeddings=max_len, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def init_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model whose weights come from an explicit generator (no global RNG)."""
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * config.initializer_range)
    return model


def encode_pairs(tokenizer: PreTrainedTokenizerFast, pairs: Sequence[tuple[str, str]],
                 max_len: int) -> list[tuple[list[int], int]]:
    """Token ids and the index where the scored continuation starts, per (context, continuation)."""
    wholes = tokenizer([c + t for c, t in pairs])["input_ids"]
    # An empty context encodes to just BOS: the whole document is scored (base pretraining).
    contexts = tokenizer([c for c, _ in pairs])["input_ids"]
    return [(whole[:max_len], min(len(ctx), max_len)) for whole, ctx in zip(wholes, contexts)]


def _batch(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (tokens, start) in enumerate(examples):
        n = len(tokens)
        ids[row, :n] = torch.tensor(tokens)
        mask[row, :n] = 1
        labels[row, start:n] = ids[row, start:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lr_at(step: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.steps * cfg.warmup_frac))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class _Cycler:
    """Seeded batches that cycle through a list of examples, reshuffled every epoch."""

    def __init__(self, examples: list[tuple[list[int], int]], batch_size: int, gen: torch.Generator) -> None:
        self.examples, self.batch_size, self.gen = examples, batch_size, gen
        self.order, self.pos = torch.randperm(len(examples), generator=gen).tolist(), 0

    def next(self, pad_id: int) -> dict[str, torch.Tensor]:
        if self.pos + self.batch_size > len(self.order):
            self.order, self.pos = torch.randperm(len(self.examples), generator=self.gen).tolist(), 0
        picked = [self.examples[i] for i in self.order[self.pos:self.pos + self.batch_size]]
        self.pos += self.batch_size
        return _batch(picked, pad_id)


def train(model: LlamaForCausalLM, examples: list[tuple[list[int], int]], cfg: TrainConfig,
          pad_id: int, seed: int, replay: list[tuple[list[int], int]] | None = None,
          replay_batch: int = 0, replay_weight: float = 1.0, trainable: str = "",
          log_every: int = 0) -> list[float]:
    """Train in place on ``examples``; returns the per-step losses (of ``examples`` alone).

    ``replay`` (optional, e.g. base-corpus documents) adds ``replay_weight`` x their loss on a
    small batch each step. It is a separate term, not mixed into one batch: whole documents have
    many more scored tokens than answers and would swamp the skill's signal.
    ``trainable`` (a regex searched in parameter names; empty = all) limits which tensors change.
    """
    gen = torch.Generator().manual_seed(seed)
    params = [p for n, p in model.named_parameters() if not trainable or re.search(trainable, n)]
    if not params:
        raise ValueError(f"no parameter name matches trainable={trainable!r}")
    frozen = [p for p in model.parameters() if all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay, eps=1e-8)
    model.train()
    losses: list[float] = []
    main = _Cycler(examples, cfg.batch_size, gen)
    extra = _Cycler(replay, replay_batch, gen) if replay and replay_batch else None
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = model(**main.next(pad_id)).loss
        total = loss if extra is None else loss + replay_weight * model(**extra.next(pad_id)).loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        losses.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            print(f"    step {step:4d} loss {losses[-1]:.3f}", flush=True)
    for p in frozen:
        p.requires_grad_(True)
    model.eval()
    return losses
