"""The README.md model card written next to a merged model.

The YAML front matter is what the Hugging Face Hub reads (``base_model`` links the merge to its
parents, ``tags`` make it findable); the body tells a human what was merged and how, and
carries the exact recipe so the merge can be reproduced.
"""

from __future__ import annotations

import os
import re

import yaml

# owner/name with the Hub's allowed characters; local paths have more slashes or start with / . ~
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _model_part(reference: str) -> str:
    """Drop mergekit's ``+lora`` suffix and ``@revision`` from a model reference."""
    return reference.split("+", 1)[0].split("@", 1)[0].strip()


def hub_id(reference: str) -> str | None:
    """The Hub repository id ``reference`` points to, or None for a local path.

    Works offline: an ``owner/name`` string that is not an existing local path counts as a Hub id.
    """
    model = _model_part(reference)
    if not _HUB_ID_RE.match(model) or os.path.exists(model):
        return None
    return model


def _fence(text: str) -> str:
    """A backtick fence longer than any backtick run inside ``text``."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _display(reference: str) -> str:
    repo = hub_id(reference)
    if repo is None:
        return f"`{reference}`"
    return f"[{reference}](https://huggingface.co/{repo})"


def render_model_card(
    recipe_yaml: str, model_refs: list[str], method: str, base_model: str | None
) -> str:
    """README.md text for a model merged from ``model_refs`` with ``method``.

    The front matter lists the Hub ids among the inputs as ``base_model`` (local paths are left
    out: the Hub rejects them), ``library_name: transformers`` and the tags ``merge`` and
    ``merge-evolve``.  The body names the method, the base model and every input, and embeds
    ``recipe_yaml`` verbatim in a yaml code block.
    """
    refs = list(dict.fromkeys(model_refs))  # unique, in recipe order
    if base_model is not None and base_model not in refs:
        refs.insert(0, base_model)
    ordered = ([base_model] if base_model else []) + [r for r in refs if r != base_model]
    hub_ids = list(dict.fromkeys(h for h in map(hub_id, ordered) if h))

    meta: dict[str, object] = {}
    if hub_ids:
        meta["base_model"] = hub_ids
    meta["library_name"] = "transformers"
    meta["tags"] = ["merge", "merge-evolve"]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()

    lines = [f"---\n{front}\n---", "", "# Merged model", ""]
    summary = f"This checkpoint combines {len(refs)} model{'s' if len(refs) != 1 else ''} "
    summary += f"with the **{method}** merge method, computed by merge-evolve's merge engine."
    lines.append(summary)
    if base_model:
        lines += ["", f"Base model: {_display(base_model)}."]
    lines += ["", "## Inputs", ""]
    for ref in refs:
        lines.append(f"- {_display(ref)}" + (" (base)" if ref == base_model else ""))
    recipe = recipe_yaml.rstrip("\n")
    fence = _fence(recipe)
    lines += [
        "",
        "## Recipe",
        "",
        "Run this recipe with `merge-yaml` (or mergekit-yaml) to reproduce the weights:",
        "",
        f"{fence}yaml",
        recipe,
        fence,
        "",
    ]
    return "\n".join(lines)
