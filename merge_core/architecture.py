"""Tensor naming of the decoder-only architectures the engine merges (Llama, Mistral, Qwen2/3).

A model's tensors fall into three groups, in the order a merge writes them:

* pre-layer tensors (``model.embed_tokens.weight``),
* per-layer tensors ``model.layers.{i}.<suffix>`` for ``i`` in ``range(num_hidden_layers)``,
* post-layer tensors (``model.norm.weight``, ``lm_head.weight``).

``lm_head.weight`` is optional: models with tied embeddings (``tie_word_embeddings``) have none
and use ``model.embed_tokens.weight`` in its place.  As in mergekit 0.1.5, a merge writes an
``lm_head`` only when at least one input has one, and a tied input then contributes its
embedding matrix.  Tensors a checkpoint holds beyond this list (e.g. ``rotary_emb.inv_freq``
in old checkpoints) are not part of the merged model, as in mergekit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from merge_core.errors import ModelError

LAYER_PREFIX = "model.layers."
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class WeightSpec:
    """One tensor of the architecture.

    ``optional`` tensors may be absent from a checkpoint; ``tied_to`` names the tensor a model
    without this one uses instead; ``vocab_axis`` is the axis indexed by token ids.
    """

    name: str
    optional: bool = False
    tied_to: str | None = None
    vocab_axis: int | None = None


_EMBED = WeightSpec("model.embed_tokens.weight", vocab_axis=0)
_NORM = WeightSpec("model.norm.weight")
_LM_HEAD = WeightSpec("lm_head.weight", optional=True, tied_to=_EMBED.name, vocab_axis=0)

_LLAMA_LAYER = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.up_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.down_proj.weight",
)
_QWEN2_LAYER = _LLAMA_LAYER + ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
_QWEN3_LAYER = _LLAMA_LAYER + ("self_attn.q_norm.weight", "self_attn.k_norm.weight")


@dataclass(frozen=True)
class Architecture:
    """The tensor layout of one architecture family."""

    name: str
    architectures: tuple[str, ...]  # config.json ``architectures[0]`` values
    layer_suffixes: tuple[str, ...]
    pre: tuple[WeightSpec, ...] = (_EMBED,)
    post: tuple[WeightSpec, ...] = (_NORM, _LM_HEAD)
    num_layers_key: str = "num_hidden_layers"

    def num_layers(self, config: dict[str, Any]) -> int:
        """Number of decoder layers ``config`` declares."""
        return int(config[self.num_layers_key])

    def layer_weights(self, index: int) -> tuple[WeightSpec, ...]:
        """The tensors of decoder layer ``index``."""
        return tuple(WeightSpec(f"{LAYER_PREFIX}{index}.{suffix}") for suffix in self.layer_suffixes)

    def all_weights(self, num_layers: int) -> list[WeightSpec]:
        """Every tensor of a model with ``num_layers`` layers, in merge order."""
        out = list(self.pre)
        for i in range(num_layers):
            out.extend(self.layer_weights(i))
        out.extend(self.post)
        return out


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("LlamaForCausalLM", "LLaMaForCausalLM"), _LLAMA_LAYER),
    Architecture("mistral", ("MistralForCausalLM",), _LLAMA_LAYER),
    Architecture("qwen2", ("Qwen2ForCausalLM",), _QWEN2_LAYER),
    Architecture("qwen3", ("Qwen3ForCausalLM",), _QWEN3_LAYER),
)
_BY_NAME = {arch_name: arch for arch in ARCHITECTURES for arch_name in arch.architectures}


def architecture_for(config: dict[str, Any], reference: str = "model") -> Architecture:
    """The architecture ``config`` (a config.json) declares; ModelError when unsupported."""
    names = config.get("architectures") or []
    if not isinstance(names, list) or len(names) != 1:
        raise ModelError(f"'{reference}': config.json must name exactly one architecture, got {names!r}")
    arch = _BY_NAME.get(names[0])
    if arch is None:
        known = ", ".join(sorted(_BY_NAME))
        raise ModelError(f"'{reference}': unsupported architecture {names[0]}; supported: {known}")
    if arch.num_layers_key not in config:
        raise ModelError(f"'{reference}': config.json has no {arch.num_layers_key}")
    layers = config[arch.num_layers_key]
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ModelError(f"'{reference}': config.json {arch.num_layers_key} must be a positive integer, got {layers!r}")
    return arch


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor name belongs to (``model.layers.12.mlp...`` -> 12), else None."""
    match = _LAYER_RE.match(name)
    return int(match.group(1)) if match else None


def rename_layer(name: str, index: int) -> str:
    """``name`` moved to decoder layer ``index`` (names outside the layers are returned as is)."""
    match = _LAYER_RE.match(name)
    return f"{LAYER_PREFIX}{index}.{match.group(2)}" if match else name
