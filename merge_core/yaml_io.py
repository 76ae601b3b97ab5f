"""Reading the YAML that users hand us (recipes, evolve configs) with bounded cost.

Plain ``yaml.safe_load`` is safe from code execution but not from size: a few hundred bytes of
nested aliases (``a: &a [*j, *j, ...]``, the "billion laughs") load as a shared graph in
milliseconds, and then every walk over it (validation, an error message's ``repr``) visits the
expanded tree, exponentially large.  So before a document is constructed its node graph is
measured as it would expand (each distinct node once, memoised), and a file is refused when it
is larger than any real recipe or config could need.  Anchors and aliases of ordinary size keep
working: recipes use them to share a ``parameters:`` block.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import yaml

from merge_core.errors import RecipeError

__all__ = ["MAX_YAML_BYTES", "MAX_YAML_NODES", "BoundedLoader", "UniqueKeyLoader", "load_yaml_file", "load_yaml_mapping",
           "load_yaml_text", "short_repr"]

MAX_YAML_BYTES = 4 * 1024 * 1024  # a recipe of thousands of slices is ~1 MB
MAX_YAML_NODES = 200_000  # values after alias expansion; real recipes and configs have a few thousand

_REPR = reprlib.Repr()
_REPR.maxstring = 50
_REPR.maxother = 50
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3


def short_repr(value: Any, limit: int = 60) -> str:
    """A ``repr`` of ``value`` of at most ``limit`` characters, built in bounded time.

    ``repr(value)[:limit]`` first renders the whole value, which for an expanded alias bomb or a
    huge list takes minutes and gigabytes; :mod:`reprlib` stops at a few items per level.
    """
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """The number of nodes ``root`` expands to (aliases counted at every use), or ``limit + 1``
    once it is certainly more.  Iterative (a deeply nested document is no recursion); each
    distinct node is visited once.  A recursive alias (a node inside itself) expands without
    end: ``limit + 1``."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the current path: meeting one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            sizes[id(node)] = 1
            continue
        if not children_done:
            if any(id(child) in open_nodes or child is node for child in children):
                return limit + 1
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
            continue
        open_nodes.discard(id(node))
        sizes[id(node)] = min(1 + sum(sizes[id(child)] for child in children), limit + 1)
    return sizes[id(root)]


class BoundedLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a document expanding to more than ``MAX_YAML_NODES`` values
    before constructing any Python object from it."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise yaml.YAMLError(f"expands to more than {MAX_YAML_NODES:,} values (nested aliases?)")
        return self.construct_document(node)


def load_yaml_text(text: str, source: str, loader: type[BoundedLoader] = BoundedLoader) -> Any:
    """Parse ``text`` with ``loader``; a one-line RecipeError naming ``source`` when it is too
    large, not YAML, or expands too far."""
    if len(text) > MAX_YAML_BYTES:
        raise RecipeError(source, f"is {len(text):,} characters; a recipe or config is at most "
                                  f"{MAX_YAML_BYTES // (1024 * 1024)} MiB")
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:
        raise RecipeError(source, "invalid YAML: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(source, f"invalid YAML{where}: {problem}") from None


def load_yaml_file(path: Path, what: str, loader: type[BoundedLoader] = BoundedLoader) -> Any:
    """Read and parse the YAML file ``path`` (``what`` names it in errors: "recipe", ...).

    The size is checked before the file is read, so a 50 MB file is refused at once.
    """
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise RecipeError(str(path), f"{what} is {size:,} bytes; at most {MAX_YAML_BYTES // (1024 * 1024)} MiB")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(str(path), f"cannot read {what}: not a UTF-8 text file") from None
    except OSError as exc:
        raise RecipeError(str(path), f"cannot read {what}: {exc.strerror or exc}") from None
    return load_yaml_text(text, str(path), loader)


class UniqueKeyLoader(BoundedLoader):
    """A bounded SafeLoader (no alias bombs, no huge files) that
    refuses a mapping with a repeated key (plain YAML keeps the last one, so a duplicated
    ``tasks:`` or ``limit:`` would silently replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: let the base class report it
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {short_repr(key)} (first at line {first})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """The YAML mapping in ``path``; a one-line RecipeError naming the file (and the line) when it
    cannot be read, is not text, is too large, is not YAML, repeats a key or is not a mapping."""
    data = load_yaml_file(path, what, UniqueKeyLoader)
    if not isinstance(data, dict):
        raise RecipeError(str(path), f"{what} must be a YAML mapping, got {type(data).__name__}")
    return data
