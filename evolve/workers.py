"""Evaluation workers: merge a candidate recipe into a resident model, check it, score it.

A :class:`CandidateWorker` is built once per process from a picklable :class:`WorkerSpec`: it
plans the template recipe(s), loads every input tensor once (:class:`InMemoryMerger`) and loads
one model + lm-eval task objects (:class:`HFEvaluator`).  Each candidate then costs a re-plan
(no file reads), an in-place merge into the evaluator's parameters, a finiteness check and one
lm-eval run.  Whatever goes wrong with one candidate becomes ``Result(status="failed")``; the
worker stays usable (the next merge overwrites every merged tensor).

Pools (the :class:`~evolve.search.EvaluationPool` protocol): :class:`LocalPool` runs one worker
in this process (tests, ``--no-ray`` debugging); :class:`~evolve.ray_pool.RayPool` runs one
worker per Ray actor with crash/timeout isolation (the default for real runs).

With the vLLM backend (``settings.backend == "vllm"``) the evaluator is a
:class:`~evolve.vllm_evaluation.VLLMEvaluator` whose weights live inside its engine: candidates
are merged into a resident state dict (allocated once) that is then pushed into the engine in
place; the finiteness check reads that dict.

Plans of one genome may list their models in different orders (slerp picks the top two models
per layer group); the in-memory merger keys inputs by model directory, so that needs nothing
here, and a model first used by a later candidate is loaded then and kept.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

# evolve.search (Result, the pool protocol) imports pycma and scipy (~1-2 s): this module is what
# every Ray actor imports, so it imports evolve.search only where a Result is built in-process;
# actors return plain dicts (``Result(**d)``).
TRAIN, HELD_OUT = "train", "held_out"  # the task-set names of evolve.search

__all__ = ["ActorWorker", "CandidateWorker", "LocalPool", "RayPool", "WorkerSpec", "one_line"]


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
    ``fault_injection``: TEST ONLY, see :func:`_inject`.
    """

    template_recipe: dict[str, Any]
    settings: Any = None  # EvalSettings; None: EvalSettings() (imported lazily: lm-eval is heavy)
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
    fault_injection: dict[str, Any] | None = None

    @property
    def device(self) -> str:
        """The evaluation device ("cpu", "cuda", ...)."""
        return str(self._settings().resolved_device())

    def _settings(self) -> Any:
        if self.settings is not None:
            return self.settings
        from evolve.evaluation import EvalSettings

        return EvalSettings()

    def tasks(self, task_set: str) -> list[Any]:
        """The task list of ``task_set`` ("train" or "held_out"); ValueError otherwise."""
        if task_set == TRAIN:
            return list(self.train_tasks)
        if task_set == HELD_OUT:
            return list(self.held_out_tasks)
        raise ValueError(f"unknown task set {task_set!r} (expected {TRAIN!r} or {HELD_OUT!r})")


def one_line(exc: BaseException) -> str:
    """``"<ExceptionType>: <first line of the message>"`` (the failure reason format)."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class CandidateWorker:
    """One resident model plus loaded inputs; :meth:`run` evaluates one candidate recipe.

    Build cost (timed in ``setup_seconds``): planning the templates, loading the inputs, loading
    the model and building the lm-eval task objects of both task sets.
    """

    def __init__(self, spec: WorkerSpec, name: str = "local-0") -> None:
        start = time.perf_counter()
        from merge_core.in_memory import InMemoryMerger
        from merge_core.planner import Planner, torch_dtype

        self.spec = spec
        self.name = name
        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        self.planner = Planner(relative_to=spec.relative_to, allow_crimes=spec.allow_crimes)
        load_plan = self._plan(spec.template_recipe)
        if spec.model_dir is not None:
            model_dir = Path(spec.model_dir)
        else:
            donor = load_plan.base_model if load_plan.base_model is not None else 0
            model_dir = Path(load_plan.models[donor].path)
        settings = spec._settings()
        self.backend = getattr(settings, "backend", "hf")
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"unknown evaluation backend {self.backend!r} (expected 'hf' or 'vllm')")
        self.staging: dict[str, torch.Tensor] | None = None
        if self.backend == "vllm":
            from evolve.vllm_evaluation import VLLMEvaluator

            # The engine first: on a GPU it claims gpu_memory_utilization of the device (vLLM
            # checks that against what is free), and the merger then sizes its inputs to what
            # is left (resident on the GPU, or streamed from CPU memory).
            self.evaluator: Any = VLLMEvaluator(model_dir, settings, threads=spec.threads)
        else:
            from evolve.evaluation import HFEvaluator

            # The model first too, so the merger's GPU budget is what the model leaves free.
        # 1 GiB of the free GPU memory stays free (activations; vLLM's resident merged dict).
            self.evaluator = HFEvaluator(model_dir, settings)
        self.merger = InMemoryMerger(load_plan, device=spec.merge_device, dtype=torch_dtype(spec.merge_dtype),
                                     reserve_bytes=1 << 30)
        if self.backend == "vllm":
            # The resident state dict every candidate is merged into and pushed from: allocated
            # once, on the merge device, in the recipe's dtype when rounding to it (the HF
            # path's _round: the engine then holds exactly merge-yaml's weights), else in the
            # evaluation dtype.
            dtype = None if spec.round_to_recipe_dtype else _torch_dtype(settings)
            self.params = self.merger.merged_state_dict(load_plan, dtype=dtype)
        else:
            # Aliases of the model's parameters: in-place writes land in the model itself.
            self.params = self.evaluator.model.state_dict()
            # Merging on one device into a model on another (CPU merge, GPU evaluation) goes
            # through staging tensors on the merge device, copied over after each merge: the
            # methods write their output with same-device ops.
            if not _same_device(self.merger.device, next(iter(self.params.values())).device):
                self._make_staging(load_plan)
        for task_set in (TRAIN, HELD_OUT):
            if spec.tasks(task_set):
                self.evaluator.task_set(spec.tasks(task_set))
        self.setup_seconds = time.perf_counter() - start
        self.evaluations = 0

    # -- planning -------------------------------------------------------------------------

    def _plan(self, recipe: dict[str, Any]) -> Any:
        from merge_core.recipe import recipe_from_dict

        return self.planner.plan(recipe_from_dict(recipe), seed=self.spec.seed)

    # -- one candidate --------------------------------------------------------------------

    def run(self, eval_id: str, recipe: dict[str, Any], task_set: str) -> Any:
        """Merge ``recipe`` into the model, check it and score ``task_set``; never raises.

        Returns an :class:`evolve.search.Result`: ``ok`` with the flat ``{task: score}``, or
        ``failed`` with a one-line reason; ``timings`` has ``merge`` (plan + merge + finiteness
        check), ``push`` (vllm backend: weights into the engine), ``eval`` and ``run`` (the
        whole call) in seconds.
        """
        from evolve.search import Result

        return Result(**self.run_dict(eval_id, recipe, task_set))

    def run_dict(self, eval_id: str, recipe: dict[str, Any], task_set: str) -> dict[str, Any]:
        """:meth:`run`, with the Result's fields as a plain dict (what actors send back)."""
        start = time.perf_counter()
        timings: dict[str, float] = {}
        try:
            tasks = self.spec.tasks(task_set)
            if not tasks:
                raise ValueError(f"task set {task_set!r} has no tasks")
            _inject(self.spec.fault_injection, "raise", eval_id)
            plan = self._plan(recipe)
            if self.staging is None:
                self.merger.merge_into(plan, self.params)
            else:
                self.merger.merge_into(plan, self.staging)
                for task in plan.tasks:
                    self.params[task.output].copy_(self.staging[task.output], non_blocking=True)
            if self.spec.round_to_recipe_dtype and plan.out_dtype is not None and self.backend == "hf":
                self._round(plan)  # (the vllm path's resident dict already has the recipe dtype)
            if _inject(self.spec.fault_injection, "nan", eval_id):
                self.params[plan.tasks[0].output].view(-1)[0] = float("nan")
            bad = self._first_non_finite(plan)
            timings["merge"] = time.perf_counter() - start
            if bad is not None:
                return self._result(eval_id, start, timings, reason=f"non-finite weights in {bad}")
            if self.backend == "vllm":
                timings["push"] = self.evaluator.push_weights({t.output: self.params[t.output] for t in plan.tasks})
            _inject(self.spec.fault_injection, "exit", eval_id)
            _inject(self.spec.fault_injection, "hang", eval_id)
            eval_start = time.perf_counter()
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
                scores: dict[str, Any] | None = None, reason: str | None = None) -> dict[str, Any]:
        self.evaluations += 1
        timings["run"] = time.perf_counter() - start
        return {"eval_id": eval_id, "status": "failed" if reason else "ok", "scores": scores or {},
                "reason": reason, "worker": self.name, "timings": timings}

    def close(self) -> None:
        """Release the model and the loaded inputs."""
        self.evaluator.close()
        self.merger = None  # type: ignore[assignment]
        self.params = {}
        self.staging = None


def _torch_dtype(settings: Any) -> torch.dtype | None:
    """The evaluation dtype of ``settings`` as a torch dtype (None for "auto")."""
    dtype = settings.resolved_dtype()
    return dtype if isinstance(dtype, torch.dtype) else None


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":  # "cuda" means the current device
        current = torch.cuda.current_device()
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index or a.type == "cpu"


def _inject(faults: dict[str, Any] | None, kind: str, eval_id: str) -> bool:
    """TEST ONLY fault hook: does fault ``kind`` fire for ``eval_id``?

    ``faults`` maps a kind to eval ids: ``raise`` (RuntimeError), ``nan`` (a merged weight set to
    NaN), ``exit`` (``os._exit(1)`` between merge and evaluation: a crashed worker), ``hang``
    (sleeps an hour: a stuck worker).  Ids also listed in ``once`` crash or hang on their first
    attempt only (a marker file in ``marker_dir`` outlives the worker process).
    """
    if not faults or eval_id not in faults.get(kind, ()):
        return False
    if kind in ("exit", "hang") and eval_id in faults.get("once", ()):
        marker = Path(faults["marker_dir"]) / f"{kind}-{eval_id.replace('/', '_')}"
        if marker.exists():
            return False
        marker.touch()
    if kind == "raise":
        raise RuntimeError(f"injected fault for {eval_id}")
    if kind == "exit":
        os._exit(1)
    if kind == "hang":
        time.sleep(3600)
    return True


class ActorWorker:
    """The Ray actor body (see evolve.ray_pool): a CandidateWorker built in the actor process.

    A setup error is kept and reported by :meth:`info` as one line (Ray's own report of a failed
    creation task is a multi-line traceback).
    """

    def __init__(self, spec: WorkerSpec, name: str) -> None:
        self.worker: CandidateWorker | None = None
        self.error: str | None = None
        try:
            self.worker = CandidateWorker(spec, name=name)
        except Exception as exc:
            self.error = one_line(exc)

    def info(self) -> dict[str, Any]:
        """Setup seconds, pid and torch threads; or ``{"error": ...}`` when setup failed."""
        if self.worker is None:
            return {"error": self.error, "pid": os.getpid()}
        return {"setup_s": self.worker.setup_seconds, "pid": os.getpid(), "threads": torch.get_num_threads(),
                "memory": self.worker.merger.memory_report()}

    def run(self, eval_id: str, recipe: dict[str, Any], task_set: str) -> dict[str, Any]:
        if self.worker is None:
            raise RuntimeError(f"worker setup failed: {self.error}")
        return self.worker.run_dict(eval_id, recipe, task_set)

    def ping(self) -> float:
        return time.perf_counter()


class LocalPool:
    """One :class:`CandidateWorker` in this process (``num_workers = 1``): tests and debugging.

    No isolation: a crash or a hang in a candidate takes the driver with it (use RayPool).
    """

    num_workers = 1

    def __init__(self, spec: WorkerSpec) -> None:
        self.worker = CandidateWorker(spec)
        self.queue: deque[tuple[str, dict[str, Any], str]] = deque()
        self.first_submit: float | None = None
        self.busy_s = 0.0

    def submit(self, eval_id: str, recipe: dict[str, Any], task_set: str) -> None:
        """Queue a job; it runs in the next :meth:`wait_any`."""
        if self.first_submit is None:
            self.first_submit = time.monotonic()
        self.queue.append((eval_id, recipe, task_set))

    def wait_any(self) -> list[Any]:
        """Run the oldest queued job and return its result."""
        if not self.queue:
            raise RuntimeError("wait_any() called with no job submitted")
        start = time.monotonic()
        result = self.worker.run(*self.queue.popleft())
        self.busy_s += time.monotonic() - start
        return [result]

    def stats(self) -> dict[str, Any]:
        """Busy seconds, evaluations, setup time and busy fraction of the one worker."""
        wall = time.monotonic() - self.first_submit if self.first_submit is not None else 0.0
        return {
            "wall_s": wall,
            "busy_fraction": self.busy_s / wall if wall > 0 else 0.0,
            "restarts": 0,
            "workers": [{"name": self.worker.name, "run_s": self.busy_s, "busy_s": self.busy_s,
                         "evaluations": self.worker.evaluations, "restarts": 0, "timeouts": 0,
                         "setup_s": [self.worker.setup_seconds],
                         "busy_fraction": self.busy_s / wall if wall > 0 else 0.0}],
        }

    def close(self) -> None:
        """Release the worker."""
        self.worker.close()


def __getattr__(name: str) -> Any:
    # RayPool lives in evolve.ray_pool; imported on first use so LocalPool users never import ray.
    if name == "RayPool":
        from evolve.ray_pool import RayPool

        return RayPool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
