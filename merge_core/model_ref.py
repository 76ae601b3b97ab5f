"""Model references: find a recipe's models on disk and read what planning needs from them.

A reference is a local directory (absolute, relative to the working directory, or relative to
the recipe's directory) or a Hugging Face hub id ``org/name`` with an optional ``@revision``,
looked up in the local HF cache the way transformers does (``HF_HUB_CACHE``, ``HF_HOME``),
without network access unless a download is asked for.

Planning reads only ``config.json`` and the safetensors headers (the 8-byte length plus JSON
at the start of each file), never tensor data.  Pickle checkpoints (``pytorch_model.bin``) are
refused: unpickling can run arbitrary code.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_core.checkpoint_files import INDEX_FILE, SINGLE_FILE, load_config, read_weight_map
from merge_core.dtypes import safetensors_codes
from merge_core.errors import ModelError, RecipeError

_REPO_ID_RE = re.compile(r"^(?:[\w\-.]+/)?[\w\-.]+$")
_PICKLE_PATTERNS = ("pytorch_model*.bin", "*.bin", "*.pt", "*.pth", "*.ckpt")


def split_revision(ref: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); mergekit allows at most one ``@``."""
    if ref.count("@") > 1:
        raise ModelError(f"'{ref}': a model reference has at most one '@' (before the revision)")
    if "@" in ref:
        name, rev = ref.split("@")
        if not name or not rev:
            raise ModelError(f"'{ref}': expected 'name@revision'")
        return name, rev
    return ref, None


def looks_like_repo_id(name: str) -> bool:
    """Whether ``name`` is a valid hub id (``name`` or ``org/name``), as huggingface_hub checks."""
    return (
        0 < len(name) <= 96
        and bool(_REPO_ID_RE.match(name))
        and "--" not in name
        and ".." not in name
        and not name.endswith(".git")
        and not name.startswith((".", "-"))
    )


def hf_hub_cache() -> Path:
    """The hub cache directory, read from the environment now (not at import, so tests and
    callers can change it): ``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME/hub``."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME")
    if not home:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        home = os.path.join(xdg, "huggingface")
    return Path(home).expanduser() / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _from_hub_cache(repo_id: str, revision: str | None, download: bool) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hf_hub_cache()
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError):
        pass
    if not download or _offline():
        return None
    try:  # same file set as mergekit downloads; pickles are never fetched
        return Path(snapshot_download(
            repo_id, revision=revision, cache_dir=cache,
            allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"],
        ))
    except Exception as err:  # network and hub errors all mean "cannot get it"
        raise ModelError(f"'{repo_id}': download failed: {type(err).__name__}: {err}") from None


def resolve_model_ref(ref: str, *, relative_to: Path | None = None, download: bool = False) -> Path:
    """The local directory of model reference ``ref``.

    Tries, in order: ``ref`` as a directory relative to the working directory (mergekit's rule),
    then relative to ``relative_to`` (the recipe's directory), then ``ref`` (minus ``@revision``)
    as a hub id in the local HF cache.  With ``download`` (and HF_HUB_OFFLINE unset) a hub id
    missing from the cache is downloaded.  Raises ModelError naming ``ref``.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ModelError(f"empty model reference {ref!r}")
    candidates = [ref]
    name, revision = split_revision(ref) if "@" in ref else (ref, None)
    if name != ref:
        candidates.append(name)
    for cand in candidates:
        path = Path(cand).expanduser()
        places = [path] if path.is_absolute() else [Path.cwd() / path]
        if relative_to is not None and not path.is_absolute():
            places.append(Path(relative_to) / path)
        for full in places:
            if full.is_dir():
                return full.resolve()
            if full.exists():
                raise ModelError(f"'{ref}': {full} is not a directory")
    if looks_like_repo_id(name):
        found = _from_hub_cache(name, revision, download)
        if found is not None:
            return found
        why = "offline: nothing is downloaded" if (not download or _offline()) else "not downloadable"
        raise ModelError(
            f"'{ref}' is neither a directory nor in the Hugging Face cache {hf_hub_cache()} ({why})"
            + _zoo_hint(name)
        )
    raise ModelError(f"no such directory '{ref}'" + _zoo_hint(name))


def _zoo_hint(name: str) -> str:
    """For a missing model of the project's toy zoo (``zoo/base``...): how to build it."""
    parts = Path(name).parts
    if "zoo" not in parts[:-1]:
        return ""
    return ("; is the toy zoo built? `python scripts/build_zoo.py` builds it into zoo/ (run it, and this, from the "
            "repository root: model paths are relative to where you run)")


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as a safetensors header describes it."""

    dtype: str  # safetensors dtype code: F32, BF16, F16...
    shape: tuple[int, ...]
    file: str  # file name inside the model directory


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of one ``.safetensors`` file, from its validated header (no data is read).

    Raises ModelError naming the file when the header is malformed.
    """
    from merge_core.tensor_io import parse_header  # imports torch: only once headers are read

    codes = safetensors_codes()
    return {
        name: TensorInfo(codes[entry.dtype], entry.shape, file.name)
        for name, entry in parse_header(file).items()
    }


def read_tensor_index(path: Path, reference: str) -> dict[str, TensorInfo]:
    """All tensors of the checkpoint in ``path`` (single file, sharded with an index, or shards
    without an index).  Raises ModelError for pickle-only or missing weights."""
    index_file = path / INDEX_FILE
    if index_file.is_file():
        headers: dict[str, dict[str, TensorInfo]] = {}
        out: dict[str, TensorInfo] = {}
        for name, fname in read_weight_map(index_file, reference).items():
            if fname not in headers:
                headers[fname] = read_safetensors_header(path / fname)
            info = headers[fname].get(name)
            if info is None:
                raise ModelError(f"'{reference}': {index_file.name} puts {name} in {fname}, which lacks it")
            out[name] = info
        return out
    single = path / SINGLE_FILE
    files = [single] if single.is_file() else sorted(path.glob("*.safetensors"))
    if files:
        out = {}
        for file in files:
            for name, info in read_safetensors_header(file).items():
                out.setdefault(name, info)
        return out
    pickles = sorted({p.name for pattern in _PICKLE_PATTERNS for p in path.glob(pattern)})
    if pickles:
        raise ModelError(
            f"'{reference}': only pickle checkpoints ({', '.join(pickles[:3])}) in {path}; pickles are "
            "refused because loading them can run arbitrary code; convert the model to safetensors"
        )
    raise ModelError(f"'{reference}': no safetensors weights in {path}")


@dataclass(frozen=True)
class ModelInfo:
    """What the planner knows about one input model (read once, cached by the Planner)."""

    reference: str
    path: Path  # the model's folder (the base model's, for a 'base+adapter' reference)
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    adapter: Any = None  # merge_core.lora.LoraAdapter merged into it when read, or None

    @property
    def source(self) -> tuple[Path, Any]:
        """What its tensors are read from: (folder, adapter), for :func:`merge_core.lora.open_checkpoint`."""
        return self.path, self.adapter

    @property
    def identity(self) -> str:
        """The real path of its folder (and adapter): two spellings of one model have one identity."""
        real = os.path.realpath(self.path)
        return real if self.adapter is None else f"{real}+{os.path.realpath(self.adapter.path)}"


def load_model_info(reference: str, path: Path) -> ModelInfo:
    """Read config.json and the tensor headers of the model ``reference`` resolved to ``path``.

    The tensors are named and shaped as the installed transformers' model holds them (fused MoE
    experts: :mod:`merge_core.checkpoint_view`), as :class:`~merge_core.tensor_io.CheckpointReader`
    reads them."""
    from merge_core.checkpoint_view import model_view

    config = load_config(path, reference)
    tensors = read_tensor_index(path, reference)
    view = model_view(config, {name: info.shape for name, info in tensors.items()})
    if view:
        hidden = {source for derived in view.values() for source in derived.sources()}
        shapes = {name: info.shape for name, info in tensors.items()}
        built = {name: TensorInfo(tensors[d.parts[0][0]].dtype, d.shape(shapes), tensors[d.parts[0][0]].file)
                 for name, d in view.items()}
        tensors = {**{n: t for n, t in tensors.items() if n not in hidden}, **built}
    return ModelInfo(reference, path, config, tensors)


def load_model(ref: str, *, relative_to: Path | None = None, download: bool = False,
               lora_merge_dtype: Any = None) -> ModelInfo:
    """Resolve and read model reference ``ref``; ``base+adapter`` is the base with the LoRA
    adapter merged when read (:mod:`merge_core.lora`; both parts resolved like models, the
    adapter matched against the base's tensors).  Raises ModelError naming ``ref``."""
    from merge_core.lora import load_adapter, split_lora_ref

    base_ref, adapter_ref = split_lora_ref(ref)
    info = load_model_info(ref, resolve_model_ref(base_ref, relative_to=relative_to, download=download))
    if adapter_ref is None:
        return info
    adapter_dir = resolve_model_ref(adapter_ref, relative_to=relative_to, download=download)
    shapes = {name: t.shape for name, t in info.tensors.items()}
    return ModelInfo(ref, info.path, info.config, info.tensors,
                     load_adapter(ref, adapter_dir, shapes, lora_merge_dtype))


def refuse_same_model_twice(entries: list[tuple[str, str, str]]) -> None:
    """(field, reference, identity: :attr:`ModelInfo.identity` or a real path) of a list of models:
    a RecipeError naming both fields when two references name the same model under other
    spellings (``zoo/a``, ``./zoo/a/``, a symlink to it, a hub id and its cache folder), which
    would count one model twice."""
    seen: dict[str, tuple[str, str]] = {}
    for where, ref, identity in entries:
        if identity in seen and seen[identity][1] != ref:
            first_where, first_ref = seen[identity]
            raise RecipeError(where, f"'{ref}' is the same model as {first_where} '{first_ref}' (both are {identity})")
        seen.setdefault(identity, (where, ref))
