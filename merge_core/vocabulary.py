"""Which token each embedding row stands for, read from a model's tokenizer files.

Models of one base usually share their tokenizer; a retrained or reordered tokenizer of the same
size does not: row 17 of one embedding is another token than row 17 of the other, and averaging
them row by row (what a merge does to token-indexed tensors) silently mixes unrelated tokens.
:func:`token_ids` reads a model's token -> id map from its files (no tokenizer code runs), and
:func:`vocabulary_difference` names the first token two models number differently, so the planner
can refuse such a merge in one line instead of writing a wrong model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge_core.errors import ModelError

__all__ = ["OutputVocabulary", "align_rows", "build_output_vocabulary", "output_vocabulary", "refuse_renumbered_tokens",
           "token_ids", "tokenizer_settings", "vocabulary_difference"]


def _from_tokenizer_json(data: dict[str, Any]) -> dict[str, int]:
    model = data.get("model") or {}
    vocab = model.get("vocab")
    ids: dict[str, int] = {}
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel
        ids.update({str(tok): int(i) for tok, i in vocab.items()})
    elif isinstance(vocab, list):  # Unigram: [token, score] in id order
        ids.update({str(entry[0]): i for i, entry in enumerate(vocab) if entry})
    for added in data.get("added_tokens") or ():
        if isinstance(added, dict) and "content" in added and "id" in added:
            ids[str(added["content"])] = int(added["id"])
    return ids


def token_ids(model_dir: Path) -> dict[str, int] | str | None:
    """The token -> id map of the tokenizer in ``model_dir``: from ``tokenizer.json`` (fast
    tokenizers) or ``vocab.json`` (+ ``added_tokens.json``); for a SentencePiece-only tokenizer
    the digest of ``tokenizer.model`` (equal files number tokens alike); None without a
    tokenizer (or one that cannot be read: nothing to compare)."""
    model_dir = Path(model_dir)
    try:
        if (model_dir / "tokenizer.json").is_file():
            return _from_tokenizer_json(json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8")))
        if (model_dir / "vocab.json").is_file():
            ids = {str(t): int(i) for t, i in json.loads((model_dir / "vocab.json").read_text(encoding="utf-8")).items()}
            added = model_dir / "added_tokens.json"
            if added.is_file():
                ids.update({str(t): int(i) for t, i in json.loads(added.read_text(encoding="utf-8")).items()})
            return ids
        if (model_dir / "tokenizer.model").is_file():
            return "sha256:" + hashlib.sha256((model_dir / "tokenizer.model").read_bytes()).hexdigest()
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return None


def vocabulary_difference(first: dict[str, int] | str, other: dict[str, int] | str, rows: int) -> str | None:
    """How two models' token numbering differs within the first ``rows`` ids (the embedding rows
    both have), or None when it does not.  A digest is compared as a whole."""
    if isinstance(first, str) or isinstance(other, str):
        return None if first == other else "their SentencePiece tokenizer.model files differ"
    by_id_first = {i: t for t, i in first.items() if i < rows}
    by_id_other = {i: t for t, i in other.items() if i < rows}
    for i in sorted(set(by_id_first) | set(by_id_other)):
        a, b = by_id_first.get(i), by_id_other.get(i)
        if a != b:
            return f"token id {i} is {a!r} in one and {b!r} in the other"
    return None


# -- an output vocabulary for models whose tokenizers differ (tokenizer_source / tokenizer:) --------


@dataclass
class OutputVocabulary:
    """The merged model's tokenizer, and where each of its tokens comes from in every input.

    ``rows[ref][i]`` is the row of model ``ref`` that holds output token id ``i``, or -1 when the
    model lacks that token (it gets a filled row: :func:`align_rows`).
    """

    tokenizer: Any  # a transformers tokenizer, saved with the merged model
    tokens: dict[str, int]  # output token -> id
    size: int  # rows of every token-indexed output tensor (pad_to_multiple_of applied)
    rows: dict[str, list[int]]
    base: str | None  # the recipe's base model (its rows win where several models have a token)
    own: dict[str, dict[str, int]] = field(default_factory=dict)  # each model's token -> its row
    fill: dict[str, Any] = field(default_factory=dict)  # tokenizer.tokens entries, by token


def _load_tokenizer(path: Path, ref: str, required: bool) -> Any:
    """The tokenizer in ``path``; None when it has none and it is not ``required`` (mergekit then
    takes the model to share the base's tokenizer)."""
    from transformers import AutoTokenizer

    if token_ids(path) is None and not required:
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path), use_fast=True, trust_remote_code=False)
    except Exception as err:  # transformers raises many kinds for a missing or broken tokenizer
        detail = str(err).splitlines()[0] if str(err) else ""
        raise ModelError(f"'{ref}': cannot load its tokenizer from {path} ({type(err).__name__}: {detail})") from None


def _stripped(tokenizer: Any, rows: int, ref: str) -> Any:
    """``tokenizer`` without the tokens numbered past the model's ``rows`` (entries nothing in
    the model embeds); BPE only, as mergekit."""
    unused = {tok for tok, i in tokenizer.get_vocab().items() if i >= rows}
    if not unused:
        return tokenizer
    from tokenizers import Tokenizer

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise ModelError(f"'{ref}': its tokenizer numbers tokens past its {rows} embedding rows and is "
                         f"{data['model']['type']}, not BPE: it cannot be the base of a merged vocabulary")
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < rows]
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if t not in unused}

    def keep(merge: Any) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        return not any(part in unused for part in parts)

    data["model"]["merges"] = [m for m in data["model"].get("merges", []) if keep(m)]
    copy = _copy_tokenizer(tokenizer)
    copy._tokenizer = Tokenizer.from_str(json.dumps(data))  # transformers' documented backend slot
    return copy


def _copy_tokenizer(tokenizer: Any) -> Any:
    """An independent copy (added tokens change it in place) through a saved folder."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp, use_fast=True, trust_remote_code=False)


def build_output_vocabulary(source: str, base: str | None, models: dict[str, Path], rows: dict[str, int],
                            tokens: dict[str, Any] | None = None,
                            pad_to_multiple_of: int | None = None) -> OutputVocabulary:
    """The output tokenizer of ``tokenizer_source`` ``source`` ("union", "base" or one of
    ``models``) for the merge of ``models`` (reference -> folder, the base first when there is
    one; ``rows``: each one's embedding rows), with mergekit 0.1.5's semantics:

    - "base": the base model's (else the first model's) tokenizer, less tokens numbered past
      its rows; a model: that model's tokenizer as it is;
    - "union": the base's, then every other token of the models (numbered below their rows),
      in model order: ordinary tokens first, then added (special) tokens with their first
      settings; each new token gets the next id;
    - ``tokens``' names are added when missing; the row count is padded to
      ``pad_to_multiple_of``.  ``rows`` of the result maps each output id to each model's row.
    """
    refs = list(models)
    first = base if base is not None else refs[0]
    loaded = {ref: _load_tokenizer(models[ref], ref, ref in (first, source)) for ref in refs}
    loaded[first] = _stripped(loaded[first], rows[first], first)
    loaded = {ref: tok if tok is not None else loaded[first] for ref, tok in loaded.items()}
    if source == "base":
        out = loaded[first]
    elif source == "union":
        out = _union(loaded, rows, first)
    else:
        out = _copy_tokenizer(loaded[source])
    present = set(out.get_vocab())
    for token in tokens or {}:
        if token not in present:
            out.add_tokens(token)
            present.add(token)
    vocab = out.get_vocab()
    size = len(vocab)
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of
    perm: dict[str, list[int]] = {}
    for ref in refs:
        own = loaded[ref].get_vocab()
        row = [-1] * len(vocab)
        for token, i in vocab.items():
            j = own.get(token)
            if j is not None and j < rows[ref]:
                row[i] = j
        perm[ref] = row
    own = {ref: dict(tok.get_vocab()) for ref, tok in loaded.items()}
    return OutputVocabulary(out, vocab, size, perm, base, own, check_token_settings(tokens or {}, refs))


def _union(loaded: dict[str, Any], rows: dict[str, int], first: str) -> Any:
    ordinary: dict[str, None] = {}
    special: dict[str, Any] = {}
    for ref in [first, *[r for r in loaded if r != first]]:
        tokenizer = loaded[ref]
        added = tokenizer.added_tokens_decoder  # id -> AddedToken
        added_text = {t.content for t in added.values()}
        for token, i in tokenizer.get_vocab().items():
            if i < rows[ref] and token not in added_text:
                ordinary.setdefault(token, None)
        for i, info in sorted(added.items()):
            if i < rows[ref]:
                special.setdefault(info.content, info)
    out = _copy_tokenizer(loaded[first])
    base_vocab = loaded[first].get_vocab()
    for token in ordinary:
        if token not in special and token not in base_vocab:
            out.add_tokens(token)
    for info in special.values():
        out.add_tokens(info)
    return out


def check_token_settings(tokens: dict[str, Any], refs: list[str]) -> dict[str, dict[str, Any]]:
    """``tokenizer.tokens`` entries validated: {token: {"source": None | "zero" | a model reference
    | ("model_token", model, token or id), "force": bool}}.  One-line RecipeError naming the entry."""
    from merge_core.errors import RecipeError

    out = {}
    for token, entry in tokens.items():
        where = f"tokenizer.tokens[{token!r}]"
        entry = entry or {}
        if not isinstance(entry, dict) or set(entry) - {"source", "force"}:
            raise RecipeError(where, "expected a mapping with 'source' and/or 'force'")
        source, force = entry.get("source"), entry.get("force", False)
        if not isinstance(force, bool):
            raise RecipeError(f"{where}.force", f"expected true or false, got {force!r}")
        if isinstance(source, dict):
            kind = source.get("kind")
            if kind == "zero" and set(source) == {"kind"}:
                source = "zero"
            elif kind == "model_token" and source.get("model") in refs and \
                    (("token" in source) != ("token_id" in source)) and set(source) <= {"kind", "model", "token", "token_id"}:
                source = ("model_token", source["model"], source.get("token", source.get("token_id")))
            else:
                raise RecipeError(f"{where}.source", "expected a merged model, {kind: zero} or {kind: model_token, "
                                                     "model: <a merged model>, token: <text> | token_id: <id>}")
        elif source is not None and source not in refs:
            raise RecipeError(f"{where}.source", f"'{source}' is not one of the merged models")
        out[token] = {"source": source, "force": force}
    return out


def align_rows(vocab: OutputVocabulary, tensors: dict[str, Any], axis: int = 0) -> dict[str, Any]:
    """Each model's token-indexed tensor (its vocabulary along ``axis``) re-indexed to the output
    vocabulary, as mergekit 0.1.5 fills it: a token every model has keeps each model's own row
    (unless ``force``d); for the others one row shared by all, from the token's
    ``tokenizer.tokens`` setting, else the one model that has it, else the base model's row,
    else the mean of the models that have it, else zeros; rows past the vocabulary
    (``pad_to_multiple_of``) get the mean of the real rows.  Computed in the promoted dtype."""
    import torch

    models = list(tensors)
    views = {m: t.movedim(axis, 0) for m, t in tensors.items()}
    shape = views[models[0]].shape[1:]
    if any(v.shape[1:] != shape for v in views.values()):
        raise ModelError(f"token-indexed tensors of other widths: {[tuple(t.shape) for t in tensors.values()]}")
    dtype = views[models[0]].dtype
    for v in views.values():
        dtype = torch.promote_types(dtype, v.dtype)
    n = len(vocab.tokens)
    index = {m: torch.tensor(vocab.rows[m], dtype=torch.long) for m in models}
    defaults: dict[int, Any] = {}
    for token, i in vocab.tokens.items():
        setting = vocab.fill.get(token)
        have = [m for m in models if vocab.rows[m][i] >= 0]
        if len(have) == len(models) and not (setting and setting["force"]):
            continue
        row = _default_row(vocab, views, token, i, have, setting, models)
        if row is not None:
            defaults[i] = row.to(dtype)
    out = {}
    for m in models:
        new = torch.zeros((vocab.size, *shape), dtype=dtype, device=views[m].device)
        own = index[m] >= 0
        for token, setting in vocab.fill.items():
            if setting["force"] and token in vocab.tokens:
                own[vocab.tokens[token]] = False
        ids = own.nonzero().flatten()
        new[ids] = views[m][index[m][ids]].to(dtype)
        for i, row in defaults.items():
            if not own[i]:
                new[i] = row
        if vocab.size > n:
            new[n:] = new[:n].mean(dim=0)
        out[m] = new.movedim(0, axis)
    return out


def _default_row(vocab: OutputVocabulary, views: dict[str, Any], token: str, i: int, have: list[str],
                 setting: dict[str, Any] | None, models: list[str]) -> Any:
    """The shared row of output token ``token`` (id ``i``) for the models that lack it."""
    import torch

    source = setting["source"] if setting else None
    if setting is None or source is None:
        if setting is None and len(have) == 1:
            return views[have[0]][vocab.rows[have[0]][i]]
        if not have:
            return torch.zeros(views[models[0]].shape[1:], dtype=views[models[0]].dtype)
        if vocab.base in have:
            return views[vocab.base][vocab.rows[vocab.base][i]]
        return torch.stack([views[m][vocab.rows[m][i]].to(torch.float32) for m in have]).mean(dim=0)
    if source == "zero":
        return torch.zeros(views[models[0]].shape[1:], dtype=views[models[0]].dtype)
    if isinstance(source, tuple):
        _, model, which = source
        row = vocab.own[model].get(which) if isinstance(which, str) else which
        if model not in views or row is None or not 0 <= row < views[model].shape[0]:
            raise ModelError(f"tokenizer.tokens[{token!r}]: {model!r} has no token {which!r} to copy")
        return views[model][row]
    if source not in views or vocab.rows[source][i] < 0:
        raise ModelError(f"tokenizer.tokens[{token!r}]: '{source}' has no token {token!r}")
    return views[source][vocab.rows[source][i]]


def tokenizer_settings(recipe: Any) -> tuple[str, dict[str, Any], int | None] | None:
    """(source, tokens, pad_to_multiple_of) when ``recipe`` merges vocabularies (its
    ``tokenizer_source`` or ``tokenizer:`` section, as mergekit reads them), else None."""
    section = recipe.tokenizer
    if section is not None:
        return section.source, dict(section.tokens or {}), section.pad_to_multiple_of
    if recipe.tokenizer_source is not None:
        return recipe.tokenizer_source, {}, None
    return None


def output_vocabulary(recipe: Any, infos: dict[str, Any], arch: Any, order: list[str]) -> OutputVocabulary:
    """The merged vocabulary of ``recipe``'s models (``infos``: their ModelInfo, ``order``: the
    plan's model order; ``arch``: the donor's layout, whose embedding counts the rows)."""
    from merge_core.errors import RecipeError

    settings = tokenizer_settings(recipe)
    assert settings is not None
    source, tokens, pad = settings
    where = "tokenizer.source" if recipe.tokenizer is not None else "tokenizer_source"
    if source not in ("base", "union") and source not in infos:
        raise RecipeError(where, f"'{source}' is not one of the merged models")
    if pad is not None and pad < 1:
        raise RecipeError("tokenizer.pad_to_multiple_of", f"must be >= 1, got {pad}")
    check_token_settings(tokens, list(infos))  # before any tokenizer is loaded
    embedding = _embedding_name(arch)
    rows = {}
    for ref, info in infos.items():
        tensor = info.tensors.get(embedding)
        rows[ref] = int(tensor.shape[0]) if tensor is not None else int(info.config.get("vocab_size") or 0)
    base = recipe.base_model
    refs = ([base] if base else []) + [r for r in order if r != base]
    return build_output_vocabulary(source, base, {r: infos[r].path for r in refs}, rows, tokens, pad)


def _embedding_name(arch: Any) -> str:
    """The token embedding's tensor name in ``arch`` (its first token-indexed tensor)."""
    name = getattr(arch, "embedding", None)
    if name:
        return name
    return next(spec.name for spec in arch.pre if spec.vocab_axis is not None)


def refuse_renumbered_tokens(infos: dict[str, Any], rows: dict[str, Any]) -> None:
    """ModelError when two models of equal vocabulary size number their tokens differently
    (read from their tokenizer files): their token-indexed rows would be merged by id, each
    row mixing unrelated tokens."""
    first_ref, first = None, None
    for ref, info in infos.items():
        ids = token_ids(info.path)
        if ids is None:
            continue
        if first is None:
            first_ref, first = ref, ids
            continue
        why = vocabulary_difference(first, ids, int(rows.get(ref) or 0))
        if why is not None:
            raise ModelError(f"'{ref}' numbers its tokens differently from '{first_ref}' ({why}): their embedding "
                             "rows would be merged by id, mixing unrelated tokens; set tokenizer_source: union (or base, "
                             "or a model) to merge them by token")
