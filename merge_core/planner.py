"""The planner: recipe + input models -> :class:`MergePlan` (one task per output tensor).

Semantics follow mergekit 0.1.5's ``MergePlanner``:

* ``models:`` is one slice over all layers of every model; a ``base_model`` not listed is
  appended as one more input.  ``slices:`` output layers are the slices' layers in order:
  output layer ``j`` of a slice comes from layer ``start + j`` of each of its sources.
* Pre-layer tensors (embeddings) come from the first slice's sources, post-layer tensors
  (norm, lm_head) from the last slice's; both evaluate gradients at ``t = 0``.  Layer ``k`` of a
  slice of ``n`` layers evaluates them at ``t = k / (n - 1)`` (``t = 1`` when ``n == 1``).
* Parameter precedence: the source's (model's) own ``parameters`` > its slice's > the
  module's > the top level; per-model parameters are not resolved for the base model of a
  method that uses one.  Global parameters are filtered on the output tensor name, per-model
  ones on that source's tensor name.
* ``lm_head.weight`` is written only when an input has one; tied inputs give their embeddings.

Structure (which tensors come from where, shape checks) depends only on the recipe's layout,
so :class:`Planner` caches it: re-planning a recipe that differs only in parameter values (the
evolve loop) reads no file and redoes only the parameter resolution.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_core.architecture import Architecture, WeightSpec, architecture_for, is_moe_layer, restack_config
from merge_core.dtypes import torch_dtype  # re-exported: callers import it from here
from merge_core.errors import MethodError, ModelError, RecipeError
from merge_core.kernels.inputs import TensorParams
from merge_core.methods import get_method
from merge_core.methods.base import MergeMethod
from merge_core.model_ref import ModelInfo, load_model, refuse_same_model_twice
from merge_core.params import Scope, resolve_param
from merge_core.plan_types import InputModel, MergePlan, TensorSource, TensorTask
from merge_core.recipe import Module, Recipe
from merge_core.vocabulary import output_vocabulary, refuse_renumbered_tokens, tokenizer_settings


def tensor_seed(run_seed: int | None, output: str) -> int:
    """A stable 63-bit seed for one output tensor (independent of processing order)."""
    digest = hashlib.blake2b(f"{run_seed or 0}\0{output}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass(frozen=True)
class _Source:
    model: str  # reference
    path: str  # YAML path of the entry naming it ("models[1]", "slices[0].sources[1]", "base_model")
    layer_range: tuple[int, int] | None  # None: all layers (models: form)
    params: dict[str, Any] | None


@dataclass(frozen=True)
class _Slice:
    sources: tuple[_Source, ...]
    base: str | None
    path: str  # "slices[0]", or "" for models: form
    params: dict[str, Any] | None
    base_path: str = "base_model"  # YAML path of the base_model that applies to this slice


@dataclass(frozen=True)
class _Skeleton:
    """One output tensor minus its parameters."""

    output: str
    sources: tuple[TensorSource, ...]
    filter_names: tuple[str, ...]  # tensor name each source's per-model filters see
    slice_index: int
    t: float
    base_index: int | None
    vocab_axis: int | None = None  # token-indexed (re-indexed when the recipe merges vocabularies)


@dataclass
class _Structure:
    models: list[str]
    slices: list[_Slice]
    skeletons: list[_Skeleton]
    out_config: dict[str, Any]
    base_model: str | None
    dropped: list[str]
    vocabulary: Any = None  # merge_core.vocabulary.OutputVocabulary when the recipe merges vocabularies


def _normalize(recipe: Recipe) -> tuple[list[_Slice], Scope | None]:
    """The recipe's inputs as slices (mergekit's ``normalize_config``), plus module parameters."""
    sections = recipe.input_sections()
    if len(sections) != 1 or (recipe.modules and "default" not in recipe.modules):
        name = next(iter(recipe.modules or {}), "?")
        raise RecipeError(f"modules.{name}", "only single-module models are supported: use the module name 'default'")
    prefix, section = sections[0]
    module_params: Scope | None = None
    if isinstance(section, Module):
        module_params = (f"{prefix}parameters", section.parameters)
    if section.models:
        sources = [_Source(m.model, f"{prefix}models[{i}]", None, m.parameters) for i, m in enumerate(section.models)]
        if recipe.base_model and all(s.model != recipe.base_model for s in sources):
            sources.append(_Source(recipe.base_model, "base_model", None, None))
        return [_Slice(tuple(sources), recipe.base_model, "", None)], module_params
    slices = []
    for i, sl in enumerate(section.slices or []):
        path = f"{prefix}slices[{i}]"
        sources = tuple(
            _Source(s.model, f"{path}.sources[{j}]", s.layer_range, s.parameters) for j, s in enumerate(sl.sources)
        )
        base_path = f"{path}.base_model" if sl.base_model else "base_model"
        slices.append(_Slice(sources, sl.base_model or recipe.base_model, path, sl.parameters, base_path))
    return slices, module_params


def _base_index(method: MergeMethod, sl: _Slice) -> int | None:
    if method.base_rule == "ignored" or sl.base is None:
        return None
    refs = [s.model for s in sl.sources]
    return refs.index(sl.base) if sl.base in refs else None


def _check_method(method: MergeMethod, slices: list[_Slice]) -> None:
    """Structural checks that need no model files: base membership, number of inputs."""
    for sl in slices:
        refs = [s.model for s in sl.sources]
        where = sl.path or "models"
        if method.base_rule != "ignored" and sl.base is not None and sl.base not in refs:
            raise RecipeError(
                sl.base_path,
                f"'{sl.base}' is not one of the models merged in {where}; "
                f"merge_method {method.name} needs its base_model among the merged models",
            )
        try:
            method.check_models(len(refs), _base_index(method, sl))
        except MethodError as err:
            if any(s.path == "base_model" for s in sl.sources):
                raise RecipeError(
                    "base_model",
                    f"'{sl.base}' is not listed in models, so it is merged as one more model, and "
                    f"merge_method {method.name} {err}",
                ) from None
            raise RecipeError(sl.path or "models", f"merge_method {method.name}: {err}") from None


class Planner:
    """Plans recipes against a fixed set of input models, caching everything read from disk.

    ``models`` maps references (as recipes write them) to :class:`ModelInfo`; references not in
    it are resolved (relative to ``relative_to``) and read on first use, then cached.
    """

    def __init__(
        self,
        models: Mapping[str, ModelInfo] | None = None,
        *,
        relative_to: Path | None = None,
        allow_crimes: bool = False,
        download: bool = False,
        lora_merge_dtype: Any = None,
        vocabulary: Any = None,
    ) -> None:
        self.models: dict[str, ModelInfo] = dict(models or {})
        self.relative_to = relative_to
        self.allow_crimes = allow_crimes
        self.download = download
        self.lora_merge_dtype = lora_merge_dtype  # dtype of the tensors a 'base+adapter' input changes
        self._structures: dict[Any, _Structure] = {}
        self._merging_vocabulary = False  # of the structure being built
        # A fixed output vocabulary (merge_core.vocabulary.OutputVocabulary): every plan's
        # token-indexed rows are re-indexed onto it (an evolve worker's model holds it).
        self.vocabulary = vocabulary

    # -- models ---------------------------------------------------------------------------
    def model_info(self, ref: str, yaml_path: str) -> ModelInfo:
        """The cached info of ``ref``, read on first use; errors carry ``yaml_path``."""
        info = self.models.get(ref)
        if info is None:
            try:
                info = load_model(ref, relative_to=self.relative_to, download=self.download,
                                  lora_merge_dtype=self.lora_merge_dtype)
            except ModelError as err:
                raise RecipeError(f"{yaml_path}", str(err)) from None
            self.models[ref] = info
        return info

    def _refuse_same_model_twice(self, recipe: Recipe) -> None:
        """Within one ``models:`` list or one slice's ``sources:``, two spellings of one folder
        would count one model twice (the recipe's own check compares strings only)."""
        for prefix, section in recipe.input_sections():
            groups = [(f"{prefix}models", [m.model for m in section.models or ()])]
            groups += [(f"{prefix}slices[{i}].sources", [s.model for s in sl.sources])
                       for i, sl in enumerate(section.slices or ())]
            for where, refs in groups:
                refuse_same_model_twice([(f"{where}[{i}].model", ref, self.models[ref].identity)
                                         for i, ref in enumerate(refs) if ref in self.models])

    # -- structure ------------------------------------------------------------------------
    @staticmethod
    def _structure_key(recipe: Recipe) -> Any:
        def src_key(prefix: str, section: Any) -> Any:
            models = tuple(m.model for m in section.models or ())
            slices = tuple(
                (sl.base_model, tuple((s.model, s.layer_range) for s in sl.sources)) for sl in section.slices or ()
            )
            return prefix, models, slices

        return (recipe.merge_method, recipe.base_model,
                tuple(src_key(p, s) for p, s in recipe.input_sections()), recipe.dtype, recipe.out_dtype,
                json.dumps(tokenizer_settings(recipe), sort_keys=True, default=str))

    def _structure(self, recipe: Recipe, method: MergeMethod) -> _Structure:
        key = self._structure_key(recipe)
        cached = self._structures.get(key)
        if cached is None:
            cached = self._build_structure(recipe, method)
            self._structures[key] = cached
        return cached

    def _build_structure(self, recipe: Recipe, method: MergeMethod) -> _Structure:
        slices, _ = _normalize(recipe)
        _check_method(method, slices)
        order: list[str] = []
        first_path: dict[str, str] = {}
        for sl in slices:
            for s in sl.sources:
                if s.model not in first_path:
                    order.append(s.model)
                    first_path[s.model] = _ref_path(s)
        if recipe.base_model and recipe.base_model not in first_path:
            order.append(recipe.base_model)
            first_path[recipe.base_model] = "base_model"
        infos = {ref: self.model_info(ref, first_path[ref]) for ref in order}
        self._refuse_same_model_twice(recipe)  # once per structure: not per evolve candidate
        archs = {ref: architecture_for(info.config, ref, info.tensors) for ref, info in infos.items()}
        donor = recipe.base_model or order[0]
        self._merging_vocabulary = self.vocabulary is not None or tokenizer_settings(recipe) is not None
        self._check_models(archs, infos, donor)
        slices = self._fill_ranges(archs, slices)
        index = {ref: i for i, ref in enumerate(order)}
        skeletons, dropped = self._skeletons(archs, donor, method, slices, infos, index)
        # The output config is the base model's (else the first model's), as in mergekit; only
        # slices change the layers, and then every per-layer entry follows its source layer.
        out_config = copy.deepcopy(infos[donor].config)
        if recipe.slices or (recipe.modules and recipe.modules["default"].slices):
            stack = [(sl.sources[0].model, layer) for sl in slices for layer in range(*sl.sources[0].layer_range)]
            out_config = restack_config(out_config, archs[donor], [(infos[m].config, i) for m, i in stack],
                                        [is_moe_layer(archs[m].layers[i]) for m, i in stack], donor)
        out_name = recipe.out_dtype or recipe.dtype
        if out_name:
            out_config["torch_dtype"] = out_name.removeprefix("torch.")
            if "dtype" in out_config:
                out_config["dtype"] = out_config["torch_dtype"]
        vocabulary = None
        if self._merging_vocabulary:  # the token-indexed rows are re-indexed onto one vocabulary
            vocabulary = self.vocabulary or output_vocabulary(recipe, infos, archs[donor], order)
            out_config["vocab_size"] = vocabulary.size
        return _Structure(order, slices, skeletons, out_config, recipe.base_model, dropped, vocabulary)

    def _check_models(self, archs: dict[str, Architecture], infos: dict[str, ModelInfo], donor: str) -> None:
        for ref, other in archs.items():
            if other.name != archs[donor].name and not self.allow_crimes:
                raise ModelError(
                    f"architecture mismatch: '{ref}' is {other.name} but '{donor}' is "
                    f"{archs[donor].name} (allow_crimes to merge anyway)"
                )
        if self._merging_vocabulary:
            return  # vocabularies may differ: the token-indexed rows are re-indexed by token
        vocab = {}
        for ref, info in infos.items():
            embed = info.tensors.get(archs[ref].embedding or "")
            vocab[ref] = embed.shape[0] if embed is not None else info.config.get("vocab_size")
        refs = list(vocab)
        for ref in refs[1:]:
            if vocab[ref] != vocab[refs[0]]:
                raise ModelError(
                    f"vocab-size mismatch: '{refs[0]}' has {vocab[refs[0]]} tokens but '{ref}' has {vocab[ref]}; "
                    "set tokenizer_source: union (or base, or a model) to merge them by token"
                )
        refuse_renumbered_tokens(infos, vocab)

    @staticmethod
    def _fill_ranges(archs: dict[str, Architecture], slices: list[_Slice]) -> list[_Slice]:
        out = []
        for sl in slices:
            sources = []
            for s in sl.sources:
                n = archs[s.model].num_layers()
                if s.layer_range is None:
                    s = _Source(s.model, s.path, (0, n), s.params)
                elif s.layer_range[1] > n:
                    raise RecipeError(
                        f"{s.path}.layer_range", f"end {s.layer_range[1]} > {archs[s.model].layer_count_name()} {n} of '{s.model}'"
                    )
                sources.append(s)
            first = sources[0]
            for s in sources[1:]:
                if s.layer_range[1] - s.layer_range[0] != first.layer_range[1] - first.layer_range[0]:
                    raise RecipeError(
                        _ref_path(s),
                        f"'{s.model}' has {s.layer_range[1]} layers but '{first.model}' has "
                        f"{first.layer_range[1]}; models: merges need equal layer counts (use slices:)",
                    )
            out.append(_Slice(tuple(sources), sl.base, sl.path, sl.params, sl.base_path))
        return out

    def _skeletons(
        self, archs: dict[str, Architecture], donor: str, method: MergeMethod, slices: list[_Slice],
        infos: dict[str, ModelInfo], index: dict[str, int],
    ) -> tuple[list[_Skeleton], list[str]]:
        skeletons: list[_Skeleton] = []
        arch = archs[donor]

        def add(spec: WeightSpec, output: str, slice_index: int, names: list[str], t: float) -> None:
            sl = slices[slice_index]
            if spec.optional and not any(n in infos[s.model].tensors for s, n in zip(sl.sources, names)):
                return  # e.g. lm_head when every input ties it to the embeddings
            sources = []
            for s, name in zip(sl.sources, names):
                tensors = infos[s.model].tensors
                tied = archs[s.model].embedding if spec.tied_to else None
                found = name if name in tensors else (tied if tied in tensors else None)
                if found is None:
                    raise ModelError(f"'{s.model}' has no tensor {name} (needed by {s.path or 'models'})")
                sources.append(TensorSource(index[s.model], found))
            self._check_shapes(output, sl, sources, infos, spec.vocab_axis if self._merging_vocabulary else None)
            skeletons.append(_Skeleton(output, tuple(sources), tuple(names), slice_index, t, _base_index(method, sl),
                                       spec.vocab_axis))

        first, last = 0, len(slices) - 1
        for spec in arch.pre:
            add(spec, spec.name, first, [spec.name] * len(slices[first].sources), 0.0)
        out_layer = 0
        for k, sl in enumerate(slices):
            start0, end0 = sl.sources[0].layer_range
            n = end0 - start0
            for j in range(n):
                t = j / (n - 1) if n > 1 else 1.0
                lead = archs[sl.sources[0].model]
                suffixes = lead.layers[start0 + j]
                for s in sl.sources[1:]:
                    other = archs[s.model].layers[s.layer_range[0] + j]
                    if other != suffixes:
                        extra = sorted(set(other) ^ set(suffixes))[0]
                        raise ModelError(
                            f"layer {s.layer_range[0] + j} of '{s.model}' and layer {start0 + j} of "
                            f"'{sl.sources[0].model}' differ in their tensors (e.g. {extra}): they cannot be merged"
                        )
                outs = [f"{arch.layer_prefix}{out_layer}.{suffix}" for suffix in suffixes]
                ins = [archs[s.model].layer_names(s.layer_range[0] + j) for s in sl.sources]
                for w, output in enumerate(outs):
                    add(WeightSpec(output), output, k, [names[w] for names in ins], t)
                out_layer += 1
        head = next((a.head for a in [arch, *archs.values()] if a.head), None)
        head_spec = arch.head_spec(head)
        for spec in arch.post + ((head_spec,) if head_spec else ()):
            add(spec, spec.name, last, [spec.name] * len(slices[last].sources), 0.0)
        # Non-layer tensors of the inputs that the output lacks (mergekit drops them too).
        outputs = {sk.output for sk in skeletons}
        dropped = sorted({name for ref, info in infos.items() for name in info.tensors
                          if name not in outputs and archs[ref].layer_index(name) is None})
        return skeletons, dropped

    @staticmethod
    def _check_shapes(output: str, sl: _Slice, sources: list[TensorSource], infos: dict[str, ModelInfo],
                      vocab_axis: int | None = None) -> None:
        """The sources of one output agree in shape (along ``vocab_axis`` they may differ: the
        rows are re-indexed to the merged vocabulary)."""
        shapes = [list(infos[s.model].tensors[src.tensor].shape) for s, src in zip(sl.sources, sources)]
        if vocab_axis is not None:
            shapes = [shape[:vocab_axis] + shape[vocab_axis + 1:] for shape in shapes]
        for s, shape in zip(sl.sources[1:], shapes[1:]):
            if shape != shapes[0]:
                raise ModelError(
                    f"tensor {output}: shape {shapes[0]} in '{sl.sources[0].model}' but {shape} in '{s.model}'"
                )

    # -- parameters -----------------------------------------------------------------------
    def plan(self, recipe: Recipe, *, seed: int | None = None) -> MergePlan:
        """Plan ``recipe``.  Raises RecipeError / ModelError (one line)."""
        try:
            method = get_method(recipe.merge_method)
        except MethodError as err:
            raise RecipeError("merge_method", str(err)) from None
        st = self._structure(recipe, method)
        tokenizer_source = self._tokenizer_source(recipe, st.models)
        # Parameters come from THIS recipe (the cached structure may stem from another one).
        slices, module_params = _normalize(recipe)
        global_scopes = [self._global_scopes(recipe, sl, module_params) for sl in slices]
        model_scopes = [
            [[(f"{s.path}.parameters", s.params)] + g if s.path != "base_model" else g for s in sl.sources]
            for sl, g in zip(slices, global_scopes)
        ]
        skip_base = method.base_rule != "ignored"
        tasks = []
        for sk in st.skeletons:
            sl = slices[sk.slice_index]
            gparams = {}
            for spec in method.global_params:
                value = resolve_param(spec, global_scopes[sk.slice_index], sk.output, sk.t, method=method.name)
                if value is not None:
                    gparams[spec.name] = value
            per_model = []
            for i, s in enumerate(sl.sources):
                values: dict[str, Any] = {}
                if not (skip_base and i == sk.base_index):
                    for spec in method.model_params:
                        value = resolve_param(
                            spec, model_scopes[sk.slice_index][i], sk.filter_names[i], sk.t,
                            method=method.name, owner=s.model,
                            missing_path="base_model" if s.path == "base_model" else None,
                        )
                        if value is not None:
                            values[spec.name] = value
                per_model.append(values)
            tasks.append(TensorTask(
                output=sk.output,
                sources=sk.sources,
                base_index=sk.base_index,
                method=method.name,
                params=TensorParams(gparams, per_model),
                seed=tensor_seed(seed, sk.output) if method.randomized else None,
                vocab_axis=sk.vocab_axis if st.vocabulary is not None else None,
            ))
        return MergePlan(
            models=[InputModel(ref, self.models[ref].path, self.models[ref].config, self.models[ref].adapter)
                    for ref in st.models],
            tasks=tasks,
            out_config=copy.deepcopy(st.out_config),
            dtype=torch_dtype(recipe.dtype),
            out_dtype=torch_dtype(recipe.out_dtype or recipe.dtype),
            tokenizer_source=tokenizer_source,
            chat_template=recipe.chat_template,
            base_model=st.models.index(st.base_model) if st.base_model else None,
            extra={"merge_method": method.name, "dropped_tensors": list(st.dropped)},
            vocabulary=st.vocabulary,
        )

    @staticmethod
    def _tokenizer_source(recipe: Recipe, models: list[str]) -> str | None:
        settings = tokenizer_settings(recipe)  # checked against the models with the structure
        return settings[0] if settings is not None else None

    @staticmethod
    def _global_scopes(recipe: Recipe, sl: _Slice, module_params: Scope | None) -> list[Scope]:
        scopes: list[Scope] = []
        if sl.path:
            scopes.append((f"{sl.path}.parameters", sl.params))
        if module_params is not None:
            scopes.append(module_params)
        scopes.append(("parameters", recipe.parameters))
        return scopes


def _ref_path(source: _Source) -> str:
    return "base_model" if source.path == "base_model" else f"{source.path}.model"


def plan_merge(
    recipe: Recipe,
    *,
    seed: int | None = None,
    relative_to: Path | None = None,
    allow_crimes: bool = False,
    trust_remote_code: bool = False,
    download: bool = False,
    lora_merge_dtype: Any = None,
) -> MergePlan:
    """Plan ``recipe`` (resolving and reading its models).  ``seed`` seeds the randomized
    methods per tensor (0 when None).  ``trust_remote_code`` is accepted for mergekit CLI
    parity: planning reads config.json as data and never runs model code.  ``lora_merge_dtype``:
    the dtype of the tensors a ``base+adapter`` input changes (default: the base tensor's)."""
    del trust_remote_code
    planner = Planner(relative_to=relative_to, allow_crimes=allow_crimes, download=download,
                      lora_merge_dtype=lora_merge_dtype)
    return planner.plan(recipe, seed=seed)


__all__ = ["Planner", "plan_merge", "tensor_seed", "torch_dtype"]
