"""A layer-stacking run's sources: checked before anything is written, merged where they are recipes.

A source is a model reference (a folder, a hub id in the local cache) or a recipe file (``.yml``
or ``.yaml``, e.g. an earlier parameter-space run's ``best_config.yaml``: Sakana's PS+DFS).
:func:`check_sources` reads them (configs and tensor headers only; a recipe is planned, not
merged) and refuses, naming ``stacking.sources[i]``: an unresolvable source, another
architecture, another depth, other layer shapes, another vocabulary or tokenizer, and depth
bounds the sources do not allow.  Workers merge recipe sources in memory; once the run
directory exists :func:`materialize` writes each one to ``STORAGE/sources/<i>-<name>/`` with the
streaming engine, the folder the exported recipes name, so ``best_config.yaml`` merges unchanged
with ``merge-yaml`` and ``mergekit-yaml``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evolve.config import StackingConfig
from evolve.storage import FINAL_MODEL
from evolve.workers.stacking import StackingSource, StackingSpec
from merge_core.errors import ModelError, RecipeError
from merge_core.yaml_io import load_yaml_file

__all__ = ["CheckedSources", "check_sources", "is_recipe", "materialize"]

RECIPE_SUFFIXES = (".yml", ".yaml")


def _plan_depth(plan: Any, info: Any) -> int:
    """The number of decoder layers a planned recipe writes (its donor's layout names them)."""
    from merge_core.architecture import architecture_for

    arch = architecture_for(info.config, str(info.path), info.tensors)
    return len({arch.layer_index(t.output) for t in plan.tasks} - {None})


def is_recipe(ref: str) -> bool:
    """Whether a source names a recipe file rather than a model."""
    return ref.endswith(RECIPE_SUFFIXES)


def source_refs(stacking: StackingConfig, storage: Path) -> list[str]:
    """The references the run's recipes name its sources by: a model source as written, a recipe
    source by the folder its merge is written to (``STORAGE/sources/<i>-<name>``)."""
    return [str((storage / "sources" / f"{i}-{Path(ref).stem}").resolve()) if is_recipe(ref) else ref
            for i, ref in enumerate(stacking.sources)]


@dataclass(frozen=True)
class CheckedSources:
    """The checked sources: the references recipes name, their shared depth, the folder the
    workers load their model (config and tokenizer) from, and what workers load."""

    refs: list[str]
    depth: int
    model_dir: Path
    spec: StackingSpec
    recipes: dict[str, Path]  # ref -> the recipe file it is merged from


def _tokenizer_digest(folder: Path) -> str | None:
    file = folder / "tokenizer.json"
    return hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else None


def _read(where: str, ref: str, relative_to: Path) -> tuple[Any, dict[str, Any] | None, Path]:
    """(the ModelInfo of the model whose shapes the source has, its recipe if it is one, its folder)."""
    from merge_core.model_ref import load_model_info, resolve_model_ref
    from merge_core.planner import Planner
    from merge_core.recipe import recipe_from_dict

    try:
        if is_recipe(ref):
            path = Path(ref) if Path(ref).is_absolute() else relative_to / ref
            recipe = load_yaml_file(path, "recipe")
            if not isinstance(recipe, dict):
                raise ModelError(f"{path}: a recipe is a YAML mapping, got {type(recipe).__name__}")
            planner = Planner(relative_to=relative_to)
            plan = planner.plan(recipe_from_dict(recipe))
            donor = plan.models[plan.base_model if plan.base_model is not None else 0]
            info = planner.models[donor.reference]
            depth = _plan_depth(plan, info)
            return info, {**recipe, "_depth": depth}, Path(donor.path)
        if "+" in ref:
            raise ModelError(f"'{ref}': a LoRA reference ('base+adapter') cannot be a stacking source; merge it "
                             "first (`merge-yaml`, or a recipe file as the source)")
        folder = resolve_model_ref(ref, relative_to=relative_to)
        return load_model_info(ref, folder), None, folder
    except (ModelError, RecipeError) as err:
        raise RecipeError(where, str(err)) from None


def check_sources(stacking: StackingConfig, relative_to: Path, storage: Path) -> CheckedSources:
    """Read and check every source (see the module docstring); nothing is merged or written."""
    from merge_core.architecture import architecture_for
    from merge_core.fsutil import refuse_overwrite
    from merge_core.model_ref import refuse_same_model_twice

    rows = []
    for i, ref in enumerate(stacking.sources):
        where = f"stacking.sources[{i}]"
        info, recipe, folder = _read(where, ref, relative_to)
        try:
            arch = architecture_for(info.config, ref, info.tensors)
        except ModelError as err:
            raise RecipeError(where, str(err)) from None
        depth = recipe.pop("_depth") if recipe is not None else arch.num_layers()
        shapes = {n: t.shape for n, t in info.tensors.items() if arch.layer_index(n) in (None, 0)}
        rows.append((where, ref, info, recipe, folder, arch, depth, shapes))
    first = rows[0]
    for where, ref, info, recipe, folder, arch, depth, shapes in rows[1:]:
        if arch != first[5]:
            raise RecipeError(where, f"'{ref}' is {info.config['architectures'][0]}, stacking.sources[0] is "
                                     f"{first[2].config['architectures'][0]}")
        if depth != first[6]:
            raise RecipeError(where, f"'{ref}' has {depth} layers, stacking.sources[0] has {first[6]}")
        for name, shape in first[7].items():
            if shapes.get(name) != shape:
                raise RecipeError(where, f"tensor {name} of '{ref}' is {shapes.get(name)}, not {shape} as in "
                                         "stacking.sources[0]: layers of other shapes cannot be stacked")
        if _tokenizer_digest(folder) != _tokenizer_digest(first[4]):
            raise RecipeError(where, f"the tokenizer of '{ref}' differs from stacking.sources[0]'s: stacked "
                                     "layers must read the same token ids")
    models = [(where, ref, folder) for where, ref, _, recipe, folder, *_ in rows if recipe is None]
    refuse_same_model_twice([(where, ref, os.path.realpath(folder)) for where, ref, folder in models])
    refuse_overwrite(storage / FINAL_MODEL, [(f"{where} '{ref}'", folder) for where, ref, folder in models],
                     "--storage-path's final model folder")
    depth = first[6]
    slots = stacking.slots or depth
    for name in ("min_layers", "max_layers"):
        value = getattr(stacking, name)
        if value is not None and value > slots:
            raise RecipeError(f"stacking.{name}", f"must be <= slots ({slots}), got {value}")
    refs = source_refs(stacking, storage)
    sources, recipes = [], {}
    for named, (_, ref, _, recipe, folder, *_rest) in zip(refs, rows):
        if recipe is None:
            sources.append(StackingSource(named, path=folder))
        else:
            sources.append(StackingSource(named, recipe=recipe))
            recipes[named] = Path(ref) if Path(ref).is_absolute() else relative_to / ref
    max_layers = max(stacking.max_layers or slots, depth)  # the preflight scores a whole source
    return CheckedSources(refs, depth, first[4], StackingSpec(tuple(sources), max_layers), recipes)


def materialize(checked: CheckedSources, relative_to: Path, seed: int) -> None:
    """Write each recipe source's merge where the exported recipes name it (once per run)."""
    from merge_core.executor import MergeOptions, run_merge
    from merge_core.planner import plan_merge
    from merge_core.recipe import recipe_from_dict

    for target, recipe_file in checked.recipes.items():
        if (Path(target) / "config.json").is_file():
            continue  # written by an earlier session of this run
        recipe = load_yaml_file(recipe_file, "recipe")
        plan = plan_merge(recipe_from_dict(recipe), seed=seed, relative_to=relative_to)
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        run_merge(plan, Path(target), recipe_file.read_text(encoding="utf-8"), MergeOptions())

