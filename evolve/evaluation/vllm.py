"""Scoring with vLLM: one resident engine per worker, candidates pushed into it in place.

The engine is started ONCE from a model folder (the base model: it supplies the config, the
tokenizer and the first weights).  For each candidate the worker merges into a resident state
dict and calls :meth:`VLLMEvaluator.push_weights`, which sends the tensors to vLLM's worker
through ``LLM.collective_rpc`` and the ``worker_extension_cls`` :class:`evolve.evaluation.vllm_worker_ext.WeightPush`
(see there why it goes through vLLM's ``reload_weights``), then resets the prefix cache: cached
KV blocks were computed with the old weights and would otherwise be reused by the next
candidate's prompts.  No files are written and the engine is never restarted.

Scoring is lm-eval's ``VLLM`` model around that engine (:class:`evolve.evaluation.vllm_lm.ResidentVLLM`),
run through the same loop, task objects and fitness as :class:`evolve.evaluation.hf.HFEvaluator`,
so multiple-choice (loglikelihood) and generate_until tasks both work and the scores match the
HF backend's.

The push needs the engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, one worker:
``tensor_parallel_size`` 1): vLLM's RPC to worker processes serialises tensors as nested lists.
Parallelism comes from running one evaluator per worker (Ray actor / GPU) instead.

vLLM is imported only inside :class:`VLLMEvaluator` (it is heavy and not in the main venv).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from evolve.config import VllmConfig
from evolve.evaluation.loop import ResidentEvaluator
from evolve.evaluation.quiet import quiet
from evolve.evaluation.registry import VLLM_MISSING
from evolve.evaluation.settings import EvalError, EvalSettings
from evolve.evaluation.tasks import TaskCatalog, memoize_lm_eval_templates
from merge_core.dtypes import DTYPE_ALIASES, RECIPE_DTYPES, canonical_name
from merge_core.errors import ModelError, first_line

if TYPE_CHECKING:
    import torch

__all__ = ["VLLMEvaluator", "engine_kwargs", "engine_settings", "prepare_environment"]

WORKER_EXTENSION = "evolve.evaluation.vllm_worker_ext.WeightPush"
# The dtypes vLLM evaluates in, by our canonical names (which are also vLLM's).
_VLLM_DTYPES = ("float32", "bfloat16", "float16")


def engine_settings(settings: EvalSettings) -> dict[str, Any]:
    """The config's ``vllm:`` values with defaults filled in; EvalError on an unknown key."""
    defaults = VllmConfig().model_dump()
    given = dict(settings.vllm or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise EvalError(f"unknown vllm engine setting(s): {', '.join(unknown)}")
    return {**defaults, **given}


def engine_kwargs(model_dir: str | Path, settings: EvalSettings) -> dict[str, Any]:
    """Keyword arguments of lm-eval's ``VLLM`` (and so of vLLM's ``LLM``) for ``model_dir``.

    - dtype: ``vllm.dtype``, else ``settings.dtype`` (--eval-dtype), else float32 on CPU (bf16
      matmuls are ~4x slower on CPUs without AMX) and bfloat16 on GPUs, as the HF evaluator.
    - max_model_len: ``vllm.max_model_len`` capped at the model's ``max_position_embeddings``
      (vLLM refuses a longer one; the config's 4096 default is longer than small models').
    - CPU: enforce_eager always (there are no CUDA graphs to capture).
    - tensor_parallel_size must be 1: the in-place push needs the single in-process worker.
    - ``settings.resized_vocabulary`` (a run that merges vocabularies: ``model_dir`` has the
      merged ``vocab_size`` and tokenizer, and its weight files the model's own vocabulary):
      the engine starts with placeholder weights (``load_format: dummy``; the files' token-indexed
      tensors do not fit it) and every weight is pushed before the first evaluation.
    """
    engine = engine_settings(settings)
    cpu = settings.resolved_device().type == "cpu"
    if int(engine["tensor_parallel_size"]) != 1:
        raise EvalError("vllm.tensor_parallel_size must be 1: candidate weights are pushed into an "
                        "in-process engine (run one worker per GPU instead)")
    dtype_name = engine["dtype"] or settings.dtype or ("float32" if cpu else "bfloat16")
    dtype = _vllm_dtype(dtype_name)
    max_len = engine["max_model_len"]
    model_max = _model_max_len(Path(model_dir))
    if max_len is not None and model_max is not None:
        max_len = min(int(max_len), model_max)
    kwargs: dict[str, Any] = {
        "pretrained": str(model_dir),
        "dtype": dtype,
        "max_model_len": max_len,
        "gpu_memory_utilization": float(engine["gpu_memory_utilization"]),
        "enforce_eager": True if cpu else bool(engine["enforce_eager"]),
        "tensor_parallel_size": 1,
        "batch_size": engine["batch_size"],
        "seed": settings.seed,
        "trust_remote_code": settings.trust_remote_code,
        "worker_extension_cls": WORKER_EXTENSION,
    }
    if engine["max_num_seqs"] is not None:
        kwargs["max_num_seqs"] = int(engine["max_num_seqs"])
    if settings.resized_vocabulary:
        kwargs["load_format"] = "dummy"
    return kwargs


def _vllm_dtype(name: str) -> str:
    """vLLM's name for an evaluation dtype spelling ("bf16" -> "bfloat16"); EvalError otherwise."""
    if name == "auto":
        return name
    try:
        canonical = canonical_name(name, aliases=True)
    except KeyError:
        canonical = None
    if canonical not in _VLLM_DTYPES:
        known = [n for n in (*RECIPE_DTYPES, *DTYPE_ALIASES) if canonical_name(n, aliases=True) in _VLLM_DTYPES]
        raise EvalError(f"unknown dtype {name!r} for vLLM (use one of {', '.join([*known, 'auto'])})")
    return canonical


def _model_max_len(model_dir: Path) -> Optional[int]:
    from merge_core.tensor_io import load_config

    try:
        config = load_config(model_dir)
    except ModelError:
        return None
    value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def _checkpoint_layers(
    model_dir: Path, packed: Mapping[str, Sequence[str]]
) -> tuple[dict[str, str], dict[str, set[str]]]:
    """Each checkpoint tensor's vLLM layer (``...q_proj.weight`` -> ``...qkv_proj``, from the
    model's packed-modules mapping), and each layer's checkpoint tensors."""
    from merge_core.tensor_io import CheckpointReader

    reader = CheckpointReader(model_dir)
    try:
        names = list(reader.names())
    finally:
        reader.close()
    fused_of = {part: fused for fused, parts in packed.items() for part in parts}
    layer_of: dict[str, str] = {}
    layers: dict[str, set[str]] = {}
    for name in names:
        module = name.rpartition(".")[0]
        parent, _, last = module.rpartition(".")
        if last in fused_of:
            module = f"{parent}.{fused_of[last]}" if parent else fused_of[last]
        layer_of[name] = module
        layers.setdefault(module, set()).add(name)
    return layer_of, layers


def prepare_environment(cpu: bool, threads: Optional[int], quiet: bool) -> None:
    """Process environment vLLM reads when it is imported / builds its engine.

    - ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (forced): the engine core and its worker run in this
      process, so pushed tensors are passed by reference (and ``LLM()`` starts in seconds
      instead of spawning processes).
    - CPU: ``VLLM_CPU_KVCACHE_SPACE`` 1 GiB unless set (vLLM's default reserves a large share
      of RAM per engine, and there is one engine per worker).
    - ``OMP_NUM_THREADS`` = ``threads``: vLLM leaves torch's thread count alone when it is set
      from outside (else it drops to 1 thread), and after the CPU worker starts in-process
      ``torch.set_num_threads`` is a no-op, so the count must be right before the engine.
    - quiet: vLLM logs at ERROR only (its INFO lines are per-engine and per-push noise).
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if threads is not None:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    if quiet:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


class VLLMEvaluator(ResidentEvaluator):
    """One vLLM engine started from ``model_dir``, scored with lm-eval after in-place pushes.

    Same interface as :class:`evolve.evaluation.hf.HFEvaluator` (``evaluate``, ``task_set``,
    ``close``) plus :meth:`push_weights`.  There is no driver-side ``nn.Module`` to write into
    (``model`` is None): the weights live inside the engine.  ``lm`` is lm-eval's model,
    ``llm`` the vLLM ``LLM``.  ``threads``: this process's torch/OpenMP threads (None:
    ``settings.threads``, else leave them).  ``setup_seconds``: the engine build.
    """

    model: Any = None

    def __init__(self, model_dir: str | Path, settings: Optional[EvalSettings] = None,
                 threads: Optional[int] = None) -> None:
        start = time.perf_counter()
        settings = settings if settings is not None else EvalSettings()
        self.settings = settings
        self.model_dir = Path(model_dir)
        self.device = settings.resolved_device()
        if not (self.model_dir / "config.json").is_file():
            raise ModelError(f"{self.model_dir}: not a model folder (no config.json)")
        kwargs = engine_kwargs(self.model_dir, settings)
        prepare_environment(self.device.type == "cpu", threads if threads is not None else settings.threads,
                            settings.quiet)
        if settings.memoize_templates:
            memoize_lm_eval_templates()
        with quiet(settings.quiet), warnings.catch_warnings():
            if settings.quiet:  # vLLM's import and first engine emit deprecation noise
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
            try:
                from evolve.evaluation.vllm_lm import ResidentVLLM
            except ImportError as exc:
                why = first_line(str(exc)) or type(exc).__name__
                raise EvalError(f"{VLLM_MISSING} (import failed: {why})") from exc
            try:
                self.lm = ResidentVLLM(**kwargs)
            except (OSError, ValueError, KeyError) as exc:
                why = first_line(str(exc)) or type(exc).__name__
                raise ModelError(f"{self.model_dir}: vLLM cannot load the model: {why}") from exc
        self.lm.show_progress = not settings.quiet
        if settings.apply_chat_template and not getattr(self.lm.tokenizer, "chat_template", None):
            self.close()
            raise EvalError(
                f"apply_chat_template is set but the tokenizer of {self.model_dir} has no "
                "chat template; set apply_chat_template: false"
            )
        self.llm = self.lm.model
        self.tokenizer = self.lm.tokenizer
        self._layer_of, self._layers = _checkpoint_layers(self.model_dir, self.llm.collective_rpc("packed_modules")[0])
        self.catalog = TaskCatalog(settings.task_search_paths, builtin_tasks=settings.builtin_tasks)
        self._task_sets = {}
        # Started with placeholder weights: the checkpoint tensors not pushed yet (scoring
        # before all are pushed would score random weights).
        self._unpushed = set(self._layer_of) if settings.resized_vocabulary else set()
        self.setup_seconds = time.perf_counter() - start
        self.pushes = 0

    def push_weights(self, state_dict: Mapping[str, torch.Tensor]) -> float:
        """Load ``state_dict`` (checkpoint names) into the running engine in place, then drop
        the prefix cache.  Returns the seconds it took.

        Any subset of whole layers may be pushed; EvalError, before anything is loaded, for a
        name the checkpoint does not have or a layer given only in part (vLLM fuses q/k/v and
        gate/up into one parameter and rebuilds a layer from what it gets: the parts not pushed
        would be left uninitialised).  The tensors are read during the call only; the caller
        may overwrite them afterwards.
        """
        self._check_whole_layers(state_dict)
        start = time.perf_counter()
        with quiet(self.settings.quiet):
            self.llm.collective_rpc("push_weights", args=(state_dict,))
            # KV blocks cached for shared prompt prefixes hold the old weights' activations:
            # without this reset the next evaluation reuses them (stale scores).
            if not self.llm.reset_prefix_cache():
                raise EvalError("vLLM could not reset its prefix cache after a weight push")
        self.pushes += 1
        self._unpushed.difference_update(state_dict)
        return time.perf_counter() - start

    def evaluate(self, tasks: Sequence[Any], **kwargs: Any) -> Any:
        """As :meth:`ResidentEvaluator.evaluate`; EvalError while an engine started with
        placeholder weights has some not pushed yet."""
        if self._unpushed:
            raise EvalError(f"vLLM engine started with placeholder weights; {len(self._unpushed)} tensors not "
                            f"pushed yet (e.g. {min(self._unpushed)!r})")
        return super().evaluate(tasks, **kwargs)

    def _check_whole_layers(self, names: Mapping[str, Any]) -> None:
        unknown = next((n for n in names if n not in self._layer_of), None)
        if unknown is not None:
            raise EvalError(f"push_weights: {unknown!r} is not a tensor of {self.model_dir}")
        for layer in {self._layer_of[n] for n in names}:
            missing = sorted(self._layers[layer] - names.keys())
            if missing:
                raise EvalError(f"push_weights: layer {layer!r} must be pushed whole; missing {', '.join(missing)}")

    def weights_fingerprint(self) -> dict[str, float]:
        """Per-parameter sums of the engine's weights as they are now (for tests and debugging)."""
        return self.llm.collective_rpc("weights_fingerprint")[0]

    def close(self) -> None:
        """Shut the engine down and release the lm-eval wrapper and the cached tasks."""
        self._task_sets = {}
        lm = getattr(self, "lm", None)
        llm = getattr(lm, "model", None)
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        self.lm = None
        self.llm = None
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

