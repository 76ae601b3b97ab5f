"""A checkpoint's layout, read from the checkpoint itself: its tensor names, shapes and config.json.

No table of families: a decoder-only model (Llama, Gemma, Phi-3, GPT-2, Mixtral...) is

* one repeated, numbered block of decoder layers, whatever its prefix (``model.layers.N.``,
  ``model.language_model.layers.N.``, ``transformer.h.N.``...).  When a checkpoint has several
  numbered blocks (a vision tower's layers beside the language model's), the decoder's is the
  one whose parent module holds the token embedding.  Numbers inside a layer (MoE experts,
  ``mlp.experts.3.w1``) are part of that layer: only the first number of a name is its layer.
  Layers may differ in their tensors (a dense first layer before MoE ones): each layer keeps
  its own list.
* the tensors outside it: ``pre`` (the token embedding, other embeddings, and whatever lives
  outside the decoder module, e.g. a vision tower) and ``post`` (final norms, the output head).
  As in mergekit a merge takes pre tensors from its first slice and post ones from its last.
* token-indexed tensors: those whose first axis is ``vocab_size`` long.  The output head is the
  token-indexed tensor outside the decoder module with the embedding's shape; a checkpoint
  without one ties it to its embedding (``tie_word_embeddings``).  As in mergekit 0.1.5, a merge
  writes a head only when an input has one, and a tied input then contributes its embedding.

What cannot be inferred is kept in small tables below: buffers that are not weights
(``rotary_emb.inv_freq`` of old checkpoints: dropped, as mergekit drops them) and config lists
that index layers by number (``mlp_only_layers``).  A checkpoint without a numbered block, with
a gap in its layers, or whose layer count disagrees with config.json is refused in one line.

Per-layer config lists (``layer_types``, ``no_rope_layers``, any list as long as the layer
count) are rewritten by :func:`restack_config` to follow the layers a merge writes.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from merge_core.errors import ModelError

# Tensors that are buffers, not weights: never merged (mergekit's definitions omit them too).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# config.json keys holding the layer count, in the order transformers' families use them.
NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# config.json keys saying which layers are dense (the others MoE), rewritten by restack_config
# from the layers written: a list of dense layer numbers (Qwen2/3-MoE, with the step that
# otherwise spaces MoE layers), and a count of leading dense layers (GLM-4-MoE, DeepSeek).
DENSE_LAYER_LIST, SPARSE_STEP = "mlp_only_layers", "decoder_sparse_step"
LEADING_DENSE = "first_k_dense_replace"
LAYER_INDEX_LISTS = (DENSE_LAYER_LIST,)
# Lists that can be as long as the layer count without being per-layer.
NOT_PER_LAYER = ("architectures", "eos_token_id", "bos_token_id", "pad_token_id")
# Nested configs of multimodal classes whose language model is the decoder.
TEXT_CONFIG_KEYS = ("text_config",)

_NUMBERED = re.compile(r"^(.*?\.)(\d+)\.(.+)$")
_EMBEDDING_PART = re.compile(r"(^|_)(emb|embed|embedding|embeddings|wte|wpe|embed_in|embed_tokens)(_|$)")


@dataclass(frozen=True)
class WeightSpec:
    """One tensor of a layout.

    ``optional`` tensors may be absent from a checkpoint; ``tied_to`` names the tensor a model
    without this one uses instead; ``vocab_axis`` is the axis indexed by token ids.
    """

    name: str
    optional: bool = False
    tied_to: str | None = None
    vocab_axis: int | None = None


@dataclass(frozen=True)
class Architecture:
    """One checkpoint's layout (see the module docstring); built by :func:`architecture_for`."""

    name: str  # config.json architectures[0]
    layer_prefix: str  # "model.layers."
    layers: tuple[tuple[str, ...], ...]  # per decoder layer, its tensors' names after the prefix and number
    pre: tuple[WeightSpec, ...]
    post: tuple[WeightSpec, ...]  # without the output head
    embedding: str | None  # the token embedding's name
    head: str | None  # the output head's name, None when tied to the embedding
    num_layers_key: tuple[str, ...] | None  # config.json path of the layer count

    def num_layers(self, config: Mapping[str, Any] | None = None) -> int:
        """Number of decoder layers of the checkpoint (``config`` is accepted for old callers)."""
        del config
        return len(self.layers)

    def layer_count_name(self) -> str:
        """How config.json names the layer count (for messages)."""
        return ".".join(self.num_layers_key) if self.num_layers_key else "the layer count"

    def layer_names(self, index: int, out_index: int | None = None) -> list[str]:
        """The tensors of layer ``index``, named as layer ``out_index`` (default: ``index``)."""
        number = index if out_index is None else out_index
        return [f"{self.layer_prefix}{number}.{suffix}" for suffix in self.layers[index]]

    def layer_weights(self, index: int) -> tuple[WeightSpec, ...]:
        """The tensors of decoder layer ``index``."""
        return tuple(WeightSpec(name) for name in self.layer_names(index))

    def layer_index(self, name: str) -> int | None:
        """The decoder layer a tensor name belongs to (``model.layers.12.mlp...`` -> 12), else None."""
        if not name.startswith(self.layer_prefix):
            return None
        number = name[len(self.layer_prefix):].split(".", 1)[0]
        return int(number) if number.isdigit() else None

    def head_spec(self, head: str | None = None) -> WeightSpec | None:
        """The output head as a post tensor: optional, tied to the embedding (``head`` names it
        when this checkpoint is tied but another input has one)."""
        name = head or self.head
        if name is None:
            return None
        return WeightSpec(name, optional=True, tied_to=self.embedding, vocab_axis=0)


def _config_value(config: Mapping[str, Any], keys: Sequence[str]) -> tuple[tuple[str, ...], Any] | None:
    """(path, value) of the first of ``keys`` in ``config``, else in its text config."""
    for key in keys:
        if key in config:
            return (key,), config[key]
    for nested in TEXT_CONFIG_KEYS:
        sub = config.get(nested)
        if isinstance(sub, Mapping):
            for key in keys:
                if key in sub:
                    return (nested, key), sub[key]
    return None


def _numbered_blocks(names: Sequence[str]) -> dict[str, dict[int, list[str]]]:
    """prefix -> layer number -> suffixes, from each name's first numbered segment."""
    blocks: dict[str, dict[int, list[str]]] = {}
    for name in names:
        match = _NUMBERED.match(name)
        if match:
            prefix, number, suffix = match.group(1), int(match.group(2)), match.group(3)
            blocks.setdefault(prefix, {}).setdefault(number, []).append(suffix)
    return blocks


def _parent(prefix: str) -> str:
    """``model.layers.`` -> ``model.``; ``h.`` -> ``""``."""
    head, _, _ = prefix.rstrip(".").rpartition(".")
    return f"{head}." if head else ""


def _is_embedding_name(name: str) -> bool:
    return any(_EMBEDDING_PART.search(part) for part in name.split(".")[:-1])


def _pick_block(blocks: dict[str, dict[int, list[str]]], token_indexed: set[str], declared: int | None,
                reference: str) -> str:
    if len(blocks) == 1:
        return next(iter(blocks))
    # The decoder is the block whose parent module holds a token-indexed tensor (its embedding).
    candidates = [p for p in blocks if any(t.startswith(_parent(p)) and t.count(".") == _parent(p).count(".") + 1
                                           for t in token_indexed)]
    if len(candidates) != 1 and declared is not None:
        candidates = [p for p in (candidates or blocks) if len(blocks[p]) == declared]
    if len(candidates) != 1:
        found = ", ".join(f"{p}N ({len(blocks[p])})" for p in sorted(blocks))
        raise ModelError(f"'{reference}': cannot tell which numbered block is the decoder's layers: {found}")
    return candidates[0]


def architecture_for(config: Mapping[str, Any], reference: str = "model",
                     tensors: Mapping[str, Any] | None = None) -> Architecture:
    """The layout of the checkpoint with ``config`` (its config.json) and ``tensors`` (name ->
    anything with ``.shape``: its safetensors header).  ModelError (one line) when the
    checkpoint cannot be understood."""
    names_list = config.get("architectures") or []
    if not isinstance(names_list, list) or len(names_list) != 1:
        raise ModelError(f"'{reference}': config.json must name exactly one architecture, got {names_list!r}")
    if not tensors:
        raise ModelError(f"'{reference}': the checkpoint has no tensors")
    found = _config_value(config, NUM_LAYERS_KEYS)
    if found is None:  # transformers would build its default depth, not the checkpoint's
        raise ModelError(f"'{reference}': config.json has no {NUM_LAYERS_KEYS[0]} (nor {', '.join(NUM_LAYERS_KEYS[1:])})")
    declared = found[1]
    if isinstance(declared, bool) or not isinstance(declared, int) or declared < 1:
        raise ModelError(f"'{reference}': config.json {'.'.join(found[0])} must be a positive integer, "
                         f"got {declared!r}")
    names = [n for n in tensors if not n.endswith(IGNORED_SUFFIXES)]
    vocab = _config_value(config, ("vocab_size", "padded_vocab_size"))
    vocab_size = vocab[1] if vocab is not None and isinstance(vocab[1], int) else None
    blocks = _numbered_blocks(names)
    if not blocks:
        raise ModelError(f"'{reference}': cannot find the decoder layers: no tensor name has a numbered "
                         f"block like model.layers.0. (names look like {names[0]!r})")
    token_indexed = {n for n in names if vocab_size is not None and len(tensors[n].shape) >= 1
                     and tensors[n].shape[0] == vocab_size}
    if not token_indexed:  # no or another vocab_size (padded rows): the token embedding's own rows
        embedded = [n for n in names if _is_embedding_name(n) and len(tensors[n].shape) == 2
                    and not any(p in n for p in ("pos", "wpe"))]
        if embedded:
            rows = tensors[embedded[0]].shape[0]
            token_indexed = {n for n in names if len(tensors[n].shape) >= 1 and tensors[n].shape[0] == rows}
    prefix = _pick_block(blocks, token_indexed, declared, reference)
    numbers = sorted(blocks[prefix])
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))
        raise ModelError(f"'{reference}': decoder layers {prefix}N are not numbered 0..{numbers[-1]} "
                         f"(layer {missing[0]} is missing)")
    if declared != len(numbers):
        raise ModelError(f"'{reference}': config.json {'.'.join(found[0])} is {declared} but the checkpoint "
                         f"has {len(numbers)} layers ({prefix}0..{numbers[-1]})")
    # Other numbered blocks (a vision tower's layers) are tensors outside the decoder.
    outside = [n for n in names if not n.startswith(prefix)]
    parent = _parent(prefix)
    inside = [n for n in outside if n.startswith(parent)]
    embeddings = [n for n in inside if n in token_indexed and n.count(".") == parent.count(".") + 1]
    embedding = next((n for n in embeddings if _is_embedding_name(n)), embeddings[0] if embeddings else None)
    head = None
    if embedding is not None:
        shape = tuple(tensors[embedding].shape)
        heads = [n for n in outside if n != embedding and n in token_indexed and tuple(tensors[n].shape) == shape
                 and (not n.startswith(parent) or not _is_embedding_name(n))]
        head = heads[0] if len(heads) == 1 else None
    pre, post = [], []
    for name in outside:
        if name == head:
            continue
        spec = WeightSpec(name, vocab_axis=0 if name in token_indexed else None)
        # Outside the decoder module: a vision tower (pre), or the head's bias (post).
        is_pre = (name == embedding or _is_embedding_name(name)
                  or (not name.startswith(parent) and name not in token_indexed))
        (pre if is_pre else post).append(spec)
    pre.sort(key=lambda s: (s.name != embedding, s.name))
    layers = tuple(tuple(sorted(blocks[prefix][i])) for i in numbers)
    return Architecture(names_list[0], prefix, layers, tuple(pre), tuple(sorted(post, key=lambda s: s.name)),
                        embedding, head, found[0])


# -- config.json of a merge ----------------------------------------------------------------


def _per_layer_paths(config: Mapping[str, Any], num_layers: int) -> list[tuple[str, ...]]:
    """Paths of the lists with one entry per layer (top level and text config)."""
    out = []
    for where in ((),) + tuple((k,) for k in TEXT_CONFIG_KEYS if isinstance(config.get(k), Mapping)):
        section = config if not where else config[where[0]]
        for key, value in section.items():
            if (isinstance(value, list) and len(value) == num_layers and key not in NOT_PER_LAYER
                    and key not in LAYER_INDEX_LISTS):
                out.append(where + (key,))
    return out


def _get(config: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(config, Mapping) or key not in config:
            return None
        config = config[key]
    return config


def _set(config: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        config = config[key]
    config[path[-1]] = value


def is_moe_layer(suffixes: Sequence[str]) -> bool:
    """Whether a decoder layer with these tensors is a mixture of experts."""
    return any("experts." in suffix or suffix.startswith("experts") for suffix in suffixes)


def _dense_layers(config: dict[str, Any], moe: Sequence[bool], reference: str) -> None:
    """Set ``config``'s dense-layer keys for layers whose MoE-ness is ``moe`` (in place)."""
    if DENSE_LAYER_LIST in config:
        config[DENSE_LAYER_LIST] = [j for j, sparse in enumerate(moe) if not sparse]
        if SPARSE_STEP in config:
            config[SPARSE_STEP] = 1  # which layers are dense is now said by the list alone
    if LEADING_DENSE in config:
        leading = next((j for j, sparse in enumerate(moe) if sparse), len(moe))
        if not all(moe[leading:]):
            raise ModelError(f"'{reference}': the layers written put a dense layer after an MoE one, which "
                             f"config.json's {LEADING_DENSE} (dense layers first) cannot describe")
        config[LEADING_DENSE] = leading


def restack_config(config: dict[str, Any], arch: Architecture, layers: Sequence[tuple[Mapping[str, Any], int]],
                   moe: Sequence[bool] | None = None, reference: str = "model") -> dict[str, Any]:
    """``config`` (the output's config.json, a copy of the donor's) for a model whose layers are
    ``layers``: (the source's config.json, its layer number) per output layer, ``moe`` saying
    which of them are mixtures of experts.  Sets the layer count and rewrites every per-layer
    list so that each written layer keeps its source layer's entry (its attention kind, its rope
    use...), and the keys saying which layers are dense."""
    out = copy.deepcopy(config)
    donor_layers = arch.num_layers()
    key = arch.num_layers_key or (NUM_LAYERS_KEYS[0],)
    _set(out, key, len(layers))
    for path in _per_layer_paths(config, donor_layers):
        values = []
        for source, layer in layers:
            entries = _get(source, path)
            if not isinstance(entries, list) or layer >= len(entries):
                entries = _get(config, path)
            values.append(entries[min(layer, len(entries) - 1)])
        _set(out, path, values)
    if moe is not None:
        _dense_layers(out, moe, reference)
        for nested in TEXT_CONFIG_KEYS:
            if isinstance(out.get(nested), dict):
                _dense_layers(out[nested], moe, reference)
    return out


__all__ = ["Architecture", "WeightSpec", "architecture_for", "is_moe_layer", "restack_config"]
