"""Evaluation workers: merge a candidate recipe into a resident model, check it, score it.

A :class:`CandidateWorker` is built once per process from a picklable :class:`WorkerSpec`: it
plans the template recipe(s), loads every input tensor once (:class:`InMemoryMerger`) and loads
one model + lm-eval task objects (:class:`HFEvaluator`).  Each candidate then costs a re-plan
(no file reads), an in-place merge into the evaluator's parameters, a finiteness check and one
lm-eval run.  Whatever goes wrong with one candidate becomes ``Result(status="failed")``; the
worker stays usable (the next merge overwrites every merged tensor).

Pools (the :class:`~evolve.protocols.EvaluationPool` protocol): :class:`~evolve.workers.local.LocalPool`
runs one worker in this process (tests, ``--no-ray`` debugging); :class:`~evolve.workers.ray_pool.RayPool`
runs one worker per Ray actor with crash/timeout isolation (the default for real runs).

The evaluator is the backend ``settings.backend`` names in :data:`evolve.evaluation.EVALUATORS`.
With the vLLM backend the evaluator's weights live inside its engine: candidates
are merged into a resident state dict (allocated once) that is then pushed into the engine in
place; the finiteness check reads that dict.

Plans of one genome may list their models in different orders (slerp picks the top two models
per layer group); the in-memory merger keys inputs by model directory, so that needs nothing
here, and a model first used by a later candidate is loaded then and kept.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from evolve.evaluation import EvalSettings, Evaluator, evaluator_class
from evolve.protocols import HELD_OUT, TRAIN, Result, one_line
from evolve.workers.faults import inject
from evolve.workers.race_eval import RaceEvaluation, race_plan
from evolve.workers.stacking import StackedModel, StackingSpec, layer_plan
from merge_core.errors import MergeError

__all__ = ["CandidateWorker", "OWN_VOCABULARY_FALLBACK", "WorkerPoolError", "WorkerSpec"]

# The note of a parent scored in the run's merged vocabulary because its own model did not fit.
OWN_VOCABULARY_FALLBACK = "scored in the merged vocabulary: its own model did not fit in memory"


class WorkerPoolError(MergeError):
    """The pool cannot run at all: a worker failed to set itself up (the same for every worker:
    a config, model or environment problem).  One line, naming the worker and the cause."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build itself (picklable: it is shipped to Ray actors).

    ``template_recipe``: any recipe of the run (a decoded genome); its inputs are loaded at
    start (tensors other candidates need are loaded on first use).  ``settings``: an :class:`~evolve.evaluation.EvalSettings`
    (its ``device`` and ``dtype`` are the evaluation device and dtype: fp32 on CPU by default).
    ``model_dir``: the model whose config + tokenizer the evaluator loads as the skeleton the
    merges are written into (None: the base model of the template plan, else its first model).
    ``merge_device``: where input tensors live and the merge math runs.  ``merge_dtype``:
    storage dtype of the inputs (None: the recipe's ``dtype``, as mergekit).  ``threads``:
    torch threads of this worker (None: leave as is).  ``round_to_recipe_dtype``: round merged weights
    to the recipe's ``out_dtype``/``dtype`` when the model holds a wider dtype (fp32 evaluation of
    a bf16 recipe), so a candidate is scored with exactly the weights ``merge-yaml`` would write.  ``seed``: seeds the randomized merge
    methods (per tensor).  ``relative_to``: folder relative model references are resolved in.
    ``fault_injection``: TEST ONLY, see :func:`evolve.workers.faults.inject`.
    """

    template_recipe: dict[str, Any]
    settings: EvalSettings | None = None  # None: EvalSettings()
    train_tasks: Sequence[Any] = ()
    held_out_tasks: Sequence[Any] = ()
    model_dir: Path | None = None
    merge_device: str = "cpu"
    merge_dtype: str | None = None
    threads: int | None = None
    seed: int = 0
    relative_to: Path | None = None
    allow_crimes: bool = False
    round_to_recipe_dtype: bool = True
    racing: bool = False  # score train jobs per document, in race order (evolve.racing)
    stacking: StackingSpec | None = None  # a layer-stacking run: its sources (evolve.workers.stacking)
    fault_injection: dict[str, Any] | None = None

    @property
    def device(self) -> str:
        """The evaluation device ("cpu", "cuda", ...)."""
        return str(self.eval_settings.resolved_device())

    @property
    def eval_settings(self) -> EvalSettings:
        """``settings``, or the defaults when None."""
        return self.settings if self.settings is not None else EvalSettings()

    def tasks(self, task_set: str) -> list[Any]:
        """The task list of ``task_set`` ("train" or "held_out"); ValueError otherwise."""
        if task_set == TRAIN:
            return list(self.train_tasks)
        if task_set == HELD_OUT:
            return list(self.held_out_tasks)
        raise ValueError(f"unknown task set {task_set!r} (expected {TRAIN!r} or {HELD_OUT!r})")


class CandidateWorker:
    """One resident model plus loaded inputs; :meth:`run` evaluates one candidate recipe.

    Build cost (timed in ``setup_seconds``): planning the templates, loading the inputs, loading
    the model and building the lm-eval task objects of both task sets.
    """

    def __init__(self, spec: WorkerSpec, name: str = "local-0") -> None:
        start = time.perf_counter()

        self.spec = spec
        self.name = name
        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        settings = spec.eval_settings
        self.backend = settings.backend
        self.staging: dict[str, torch.Tensor] | None = None
        self.stacked: StackedModel | None = None
        self.scratch: Path | None = None  # the model folder of a merged vocabulary (removed at close)
        self.own_vocabulary: Any = None  # an OwnVocabularyScorer in a run that merges vocabularies
        if spec.stacking is not None:
            self._setup_stacking(spec, settings)
        else:
            self._setup_merging(spec, settings)
        for task_set in (TRAIN, HELD_OUT):
            if spec.tasks(task_set):
                self.evaluator.task_set(spec.tasks(task_set))
        self.racer: RaceEvaluation | None = None
        self.race_off: str | None = None  # why the train tasks cannot be raced
        if spec.racing and spec.train_tasks:
            tasks = spec.tasks(TRAIN)
            orders, self.race_off = race_plan(tasks, self.evaluator.task_set(tasks), settings.limit, spec.seed)
            if orders is not None:
                self.racer = RaceEvaluation(self.evaluator, tasks, orders)
        self.setup_seconds = time.perf_counter() - start
        self.evaluations = 0

    def _setup_merging(self, spec: WorkerSpec, settings: EvalSettings) -> None:
        """Parameter space: the evaluator, then the merger that writes candidates into it."""
        from merge_core.in_memory import InMemoryMerger
        from merge_core.planner import Planner, torch_dtype

        self.planner = Planner(relative_to=spec.relative_to, allow_crimes=spec.allow_crimes)
        load_plan = self._plan(spec.template_recipe)
        donor = load_plan.base_model if load_plan.base_model is not None else 0
        if spec.model_dir is not None:
            model_dir = Path(spec.model_dir)
        else:
            model_dir = Path(load_plan.models[donor].path)
        if load_plan.vocabulary is not None:  # a merged vocabulary: every plan's rows onto it
            from evolve.workers.vocabulary_model import is_own_vocabulary, vocabulary_model_dir

            self.planner.vocabulary = load_plan.vocabulary
            if not is_own_vocabulary(load_plan.vocabulary, load_plan.models[donor].reference):
                model_dir = self.scratch = vocabulary_model_dir(model_dir, load_plan.vocabulary)
                settings = dataclasses.replace(settings, resized_vocabulary=True)
            if self.backend == "hf":  # (vLLM: refused in the preflight)
                from evolve.workers.own_vocabulary import OwnVocabularyScorer

                self.own_vocabulary = OwnVocabularyScorer(
                    Planner(relative_to=spec.relative_to, allow_crimes=spec.allow_crimes), spec.eval_settings,
                    threads=spec.threads, round_to_recipe_dtype=spec.round_to_recipe_dtype, seed=spec.seed)
        # The evaluator first: on a GPU the model (or vLLM's engine, which claims
        # gpu_memory_utilization of the device and checks that against what is free) takes its
        # memory, and the merger then sizes its inputs to what is left (resident on the GPU, or
        # streamed from CPU memory); 1 GiB of the free GPU memory stays free (activations;
        # vLLM's resident merged dict).
        self.evaluator: Evaluator = evaluator_class(self.backend)(model_dir, settings, threads=spec.threads)
        self.merger = InMemoryMerger(load_plan, device=spec.merge_device, dtype=torch_dtype(spec.merge_dtype),
                                     reserve_bytes=1 << 30, state_on_device=self.evaluator.model is None)
        self.weights_in_engine = self.evaluator.model is None  # the weights live in an engine: push them
        if self.weights_in_engine:
            # The resident state dict every candidate is merged into and pushed from: allocated
            # once, on the merge device, in the recipe's dtype when rounding to it (the HF
            # path's _round: the engine then holds exactly merge-yaml's weights), else in the
            # evaluation dtype.
            dtype = None if spec.round_to_recipe_dtype else settings.torch_dtype()
            self.params = self.merger.merged_state_dict(load_plan, dtype=dtype)
        else:
            # Aliases of the model's parameters: in-place writes land in the model itself.
            self.params = self.evaluator.model.state_dict()
            # Merging on one device into a model on another (CPU merge, GPU evaluation) goes
            # through staging tensors on the merge device, copied over after each merge: the
            # methods write their output with same-device ops.
            if not _same_device(self.merger.device, next(iter(self.params.values())).device):
                self._make_staging(load_plan)

    def _setup_stacking(self, spec: WorkerSpec, settings: EvalSettings) -> None:
        """Layer stacking: the evaluator, then the resident sources its layers are pointed at."""
        assert spec.stacking is not None and spec.model_dir is not None
        if settings.backend != "hf":
            raise ValueError("layer stacking is evaluated with the HF backend only")
        self.evaluator = evaluator_class(self.backend)(Path(spec.model_dir), settings, threads=spec.threads)
        self.weights_in_engine = False
        from merge_core.planner import torch_dtype

        dtype = torch_dtype(spec.template_recipe.get("dtype")) if spec.round_to_recipe_dtype else None
        self.stacked = StackedModel(self.evaluator.model, spec.stacking, dtype=dtype, relative_to=spec.relative_to,
                                    seed=spec.seed)
        self.params = {}

    def memory_report(self) -> str:
        """Where this worker's inputs live and what they take; for merging workers also the
        merged state (the evaluated model's parameters, or the dict pushed into an engine, and
        any staging copy) and the method caches."""
        if self.stacked is not None:
            return self.stacked.memory_report()
        from merge_core.in_memory import format_bytes

        line = self.merger.memory_report()
        for what, tensors in (("merged state", self.params), ("staging", self.staging or {})):
            if tensors:
                held = sum(t.numel() * t.element_size() for t in tensors.values())
                line += f"; {what}: {format_bytes(held)} on {next(iter(tensors.values())).device}"
        return line

    # -- planning -------------------------------------------------------------------------

    def _plan(self, recipe: dict[str, Any]) -> Any:
        from merge_core.recipe import recipe_from_dict

        return self.planner.plan(recipe_from_dict(recipe), seed=self.spec.seed)

    # -- one candidate --------------------------------------------------------------------

    def run(self, eval_id: str, recipe: dict[str, Any], task_set: str, race: Any = None) -> Result:
        """Merge ``recipe`` into the model, check it and score ``task_set``; never raises.

        With racing (``spec.racing`` and raceable train tasks) a train job is scored per document
        in race order: against ``race`` (an :class:`evolve.racing.RaceJob`) chunk by chunk, else
        on every document (its values then serve later races).

        Returns a :class:`~evolve.protocols.Result`: ``ok`` with the flat ``{task: score}``, or
        ``failed`` with a one-line reason; ``timings`` has ``merge`` (plan + merge + finiteness
        check), ``push`` (vllm backend: weights into the engine), ``eval`` and ``run`` (the
        whole call) in seconds.
        """
        start = time.perf_counter()
        timings: dict[str, float] = {}
        try:
            tasks = self.spec.tasks(task_set)
            if not tasks:
                raise ValueError(f"task set {task_set!r} has no tasks")
            inject(self.spec.fault_injection, "raise", eval_id)
            if self.stacked is not None:
                self.stacked.apply(layer_plan(recipe, self.stacked.refs))
                timings["merge"] = time.perf_counter() - start
                return self._score(eval_id, task_set, race, tasks, start, timings)
            note = None
            if self.own_vocabulary is not None:
                own = self._own_vocabulary_plan(recipe)
                if own is not None:
                    try:
                        scores, reason = self.own_vocabulary.score(own, tasks, timings)
                        return self._result(eval_id, start, timings, scores=scores, reason=reason)
                    except (MemoryError, RuntimeError) as exc:  # (torch.OutOfMemoryError is a RuntimeError)
                        if not isinstance(exc, (torch.OutOfMemoryError, MemoryError)) and \
                                "can't allocate memory" not in str(exc):  # the CPU allocator's words
                            raise
                        # Its own model does not fit next to the worker's: score it in the run's
                        # vocabulary (its own rows for its tokens) rather than not at all, and say so.
                        self.own_vocabulary.release(after_failure=True)
                        note = OWN_VOCABULARY_FALLBACK
            plan = self._plan(recipe)
            if self.staging is None:
                self.merger.merge_into(plan, self.params)
            else:
                self.merger.merge_into(plan, self.staging)
                for task in plan.tasks:
                    self.params[task.output].copy_(self.staging[task.output], non_blocking=True)
            if self.spec.round_to_recipe_dtype and plan.out_dtype is not None and not self.weights_in_engine:
                self._round(plan)  # (a pushed resident dict already has the recipe dtype)
            if inject(self.spec.fault_injection, "nan", eval_id):
                self.params[plan.tasks[0].output].view(-1)[0] = float("nan")
            bad = self._first_non_finite(plan)
            timings["merge"] = time.perf_counter() - start
            if bad is not None:
                return self._result(eval_id, start, timings, reason=f"non-finite weights in {bad}")
            if self.weights_in_engine:
                pushed = {t.output: self.params[t.output] for t in plan.tasks}
                timings["push"] = self.evaluator.push_weights(pushed)  # type: ignore[attr-defined]
            result = self._score(eval_id, task_set, race, tasks, start, timings)
            result.note = note
            return result
        except Exception as exc:  # one bad candidate must not take the worker down
            return self._result(eval_id, start, timings, reason=one_line(exc))

    def _own_vocabulary_plan(self, recipe: dict[str, Any]) -> Any:
        """The plan of a recipe that leaves its vocabulary to its models when that is not the
        run's merged one (a parent's baseline: scored with its own tokenizer); else None, and
        the side model is released."""
        from evolve.workers.own_vocabulary import names_no_vocabulary
        from evolve.workers.vocabulary_model import is_own_vocabulary

        if names_no_vocabulary(recipe):
            plan = self.own_vocabulary.plan(recipe)
            if not all(is_own_vocabulary(self.planner.vocabulary, m.reference) for m in plan.models):
                return plan
        self.own_vocabulary.release()
        return None

    def _score(self, eval_id: str, task_set: str, race: Any, tasks: list[Any], start: float,
               timings: dict[str, float]) -> Result:
        """Score the weights the model holds now (raced, per document, or plainly)."""
        try:
            inject(self.spec.fault_injection, "exit", eval_id)
            inject(self.spec.fault_injection, "hang", eval_id)
            eval_start = time.perf_counter()
            if task_set == TRAIN and self.racer is not None:
                outcome = self.racer.race(race) if race is not None else self.racer.full()
                timings["eval"] = time.perf_counter() - eval_start
                result = self._result(eval_id, start, timings, scores=outcome.scores)
                result.documents, result.documents_full = outcome.documents, outcome.documents_full
                result.per_doc, result.race = outcome.per_doc, outcome.race
                return result
            scored = self.evaluator.evaluate(tasks)
            timings["eval"] = time.perf_counter() - eval_start
            if scored.error is not None:
                return self._result(eval_id, start, timings, reason=scored.error)
            return self._result(eval_id, start, timings, scores=dict(scored.scores))
        except Exception as exc:  # one bad candidate must not take the worker down
            return self._result(eval_id, start, timings, reason=one_line(exc))

    def _make_staging(self, plan: Any) -> None:
        """Merge-device twins of the merged parameters (same dtype as the model's)."""
        self.staging = {}
        for task in plan.tasks:
            target = self.params.get(task.output)
            if target is not None and task.output not in self.staging:
                self.staging[task.output] = torch.empty(target.shape, dtype=target.dtype, device=self.merger.device)

    def _round(self, plan: Any) -> None:
        for task in plan.tasks:
            param = self.params[task.output]
            if param.dtype.is_floating_point and param.element_size() > plan.out_dtype.itemsize:
                param.copy_(param.to(plan.out_dtype))

    def _first_non_finite(self, plan: Any) -> str | None:
        for task in plan.tasks:
            if not bool(torch.isfinite(self.params[task.output]).all()):
                return task.output
        return None

    def _result(self, eval_id: str, start: float, timings: dict[str, float], *,
                scores: dict[str, Any] | None = None, reason: str | None = None) -> Result:
        self.evaluations += 1
        timings["run"] = time.perf_counter() - start
        return Result(eval_id=eval_id, status="failed" if reason else "ok", scores=scores or {},
                      reason=reason, worker=self.name, timings=timings)

    def close(self) -> None:
        """Release the model and the loaded inputs (a stacking run's sources too)."""
        self.stacked = None
        if self.own_vocabulary is not None:
            self.own_vocabulary.release()
        self.evaluator.close()
        if self.scratch is not None:  # a merged vocabulary's model folder
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
        self.merger = None  # type: ignore[assignment]
        self.params = {}
        self.staging = None


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":  # "cuda" means the current device
        current = torch.cuda.current_device()
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index or a.type == "cpu"
